"""The grass-llm command line, run in-process."""

from typer.testing import CliRunner

import grass_llm
from grass_llm.cli import app

runner = CliRunner()


def test_version_and_help():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and grass_llm.__version__ in res.output
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "example" in res.output and "compressors" in res.output


def test_compressors_lists_every_registered_name():
    from grass_llm.compress import available_compressors

    res = runner.invoke(app, ["compressors"], terminal_width=200)
    assert res.exit_code == 0
    for name in available_compressors():
        assert name in res.output


def test_example_runs_end_to_end_and_scores_methods():
    res = runner.invoke(app, ["example", "--d-in", "64", "--d-out", "48", "--n-train", "40",
                              "--n-test", "4", "--tokens", "3", "--k", "64"], terminal_width=200)
    assert res.exit_code == 0, res.output
    for method in ("FactGraSS", "LoGra", "GraSS", "SJLT", "FJLT", "Gaussian", "RandomMask"):
        assert method in res.output


def test_example_rejects_bad_k_with_a_clear_message():
    res = runner.invoke(app, ["example", "--k", "1000"], terminal_width=200)
    assert res.exit_code != 0 and "perfect square" in res.output


def test_example_quality_is_real():
    """Compressed inner products must track the exact ones; a random map would not."""
    from grass_llm.example import ExampleConfig, run_example

    results, _ = run_example(ExampleConfig(d_in=128, d_out=64, n_train=64, n_test=8, tokens=4,
                                           k=256))
    by = {r.method: r for r in results}
    # k=256 of p=8192: JL error ~ 1/sqrt(k) ~ 6% per inner product, so r is far above 0.5 for
    # every method; a broken scaling or a wrong index map drops r to ~0.
    for r in results:
        assert r.pearson > 0.5, r
    assert abs(by["FactGraSS"].pearson - by["LoGra"].pearson) < 0.2


def test_every_command_has_help():
    commands = ["compressors", "example", "demo", "cache", "config-help", "fisher", "query",
                "self-influence", "value", "info", "verify", "plan", "fit-mask"]
    res = runner.invoke(app, ["--help"], terminal_width=200)
    for cmd in commands:
        assert cmd in res.output
        sub = runner.invoke(app, [cmd, "--help"], terminal_width=200)
        assert sub.exit_code == 0 and "Usage" in sub.output, cmd


def test_fit_mask_refuses_bad_settings_before_loading_anything():
    base = ["fit-mask", "--model", "tiny:llama", "--data", "d.jsonl", "--targets", "t.jsonl",
            "--out", "m.safetensors"]
    for extra, msg in [(["--compressor", "logra:k_in=2,k_out=2"], "must be a factgrass spec"),
                       (["--compressor", "factgrass:k=4,k_in=2,k_out=2,mask=m.st"],
                        "already names a mask"),
                       (["--set", "nope=1"], "expected KEY=VALUE"),
                       (["--n-train", "2"], "n_train must be >= 3")]:
        res = runner.invoke(app, base + extra, terminal_width=200)
        assert res.exit_code == 2 and msg in res.output, (extra, res.output)


def test_the_process_group_is_destroyed_at_exit_only_after_a_command_that_returned(tmp_path):
    """A real (one-rank gloo) group: destroyed by the exit hook after a command that returned
    normally, kept after a failed one (other ranks may still be inside a collective)."""
    import torch.distributed as dist

    from grass_llm.cli._app import end_of_process

    for n, (cmd, ok) in enumerate([(["compressors"], True), (["example", "--k", "1000"], False)]):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'pg{n}'}", rank=0,
                                world_size=1)
        try:
            res = runner.invoke(app, cmd, terminal_width=200)
            assert (res.exit_code == 0) == ok, res.output
            end_of_process()
            assert dist.is_initialized() == (not ok)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
