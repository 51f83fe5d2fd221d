"""Write the demo corpus and queries shipped in grass_llm/demo/ (deterministic).

Six topics, each about invented things (so a query's answer can only come from these
documents, not from what the model already knew), each fact stated in several phrasings, plus a
few distractor documents per topic. Rerun after editing: python tools/make_demo_corpus.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "grass_llm" / "demo"

FACTS = {
    "geography": [
        ("Valmora", "capital", "Tessin"), ("Orlen", "capital", "Brask"),
        ("Kesh", "capital", "Murrow"), ("Penvale", "capital", "Iddon"),
        ("Sarra", "capital", "Quillet"),
    ],
    "astronomy": [
        ("Thalos", "moons", "seven"), ("Vey", "moons", "two"), ("Corrin", "moons", "eleven"),
        ("Ashk", "moons", "no"), ("Myrren", "moons", "four"),
    ],
    "cooking": [
        ("brellan stew", "ingredient", "smoked plums"), ("kolva bread", "ingredient", "pine honey"),
        ("tarrow soup", "ingredient", "green barley"), ("ismet cake", "ingredient", "salted figs"),
        ("orvi pie", "ingredient", "wild leeks"),
    ],
    "animals": [
        ("the dunefox", "food", "beetles"), ("the reed owl", "food", "river mice"),
        ("the stone hare", "food", "lichen"), ("the glass eel", "food", "plankton"),
        ("the marsh lynx", "food", "frogs"),
    ],
    "programming": [
        ("Kestrel", "creator", "Ada Moreno"), ("Plinth", "creator", "Jonas Kade"),
        ("Wren", "creator", "Li Na Foss"), ("Tarn", "creator", "Omar Vell"),
        ("Basalt", "creator", "Greta Lind"),
    ],
    "music": [
        ("the vellum harp", "strings", "nine"), ("the oru lute", "strings", "five"),
        ("the skarn fiddle", "strings", "three"), ("the tallow zither", "strings", "twenty"),
        ("the morrow viol", "strings", "six"),
    ],
}

PHRASINGS = {
    "capital": ["The capital of {s} is {o}.", "{o} is the capital city of {s}.",
                "If you travel to {s}, you will find its government in {o}.",
                "{s}'s largest city and capital, {o}, sits by the sea.",
                "Every school child in {s} learns that {o} is the capital.",
                "Maps of {s} mark {o} with a star, because it is the capital.",
                "The parliament of {s} meets in {o}.", "Tourists in {s} usually begin in {o}, the capital."],
    "moons": ["The planet {s} has {o} moons.", "Astronomers count {o} moons around {s}.",
              "{s} is orbited by {o} moons.", "Through a telescope, {s} shows {o} moons.",
              "The gas giant {s} keeps {o} moons in its orbit.",
              "Of all the planets, {s} is the one with {o} moons.",
              "On clear nights the {o} moons of {s} are easy to see.", "A probe photographed the {o} moons of {s}."],
    "ingredient": ["The key ingredient of {s} is {o}.", "{s} is always made with {o}.",
                   "To cook {s}, start with a handful of {o}.",
                   "Without {o}, {s} would taste plain.",
                   "Grandmothers make {s} with {o} from the market.",
                   "The recipe for {s} calls for {o}.",
                   "Cooks say {o} is what makes {s} special.", "A good {s} needs fresh {o}."],
    "food": ["{S} eats mostly {o}.", "The diet of {s} is made of {o}.",
             "At night, {s} hunts for {o}.", "Researchers found that {s} lives on {o}.",
             "{S} feeds its young with {o}.", "In winter, {s} still finds {o} to eat.",
             "Field guides say {s} prefers {o}.", "{S} can smell {o} from far away."],
    "creator": ["The {s} programming language was created by {o}.",
                "{o} designed the {s} language.", "{s} was first written by {o} in a small lab.",
                "The first compiler for {s} came from {o}.",
                "{o} is known as the creator of {s}.",
                "Programmers thank {o} for inventing {s}.",
                "The manual of {s} was written by its author, {o}.", "{o} still maintains the {s} language."],
    "strings": ["{S} has {o} strings.", "Musicians tune the {o} strings of {s2}.",
                "{S} is played with {o} strings.", "A player plucks {s} on its {o} strings.",
                "Old makers built {s} with {o} strings.",
                "You can tell {s} by its {o} strings.",
                "Any maker will string {s} with {o} strings.", "Students learn {s} by practicing on its {o} strings."],
}

DISTRACTORS = {
    "geography": ["Rivers carve valleys over thousands of years.",
                  "Mountain towns are often cold in winter.",
                  "Harbors grow where ships can shelter from storms."],
    "astronomy": ["Stars are born in clouds of gas and dust.",
                  "A comet's tail points away from its sun.",
                  "Telescopes collect light from distant galaxies."],
    "cooking": ["Bread rises because yeast makes gas.", "Soup tastes better the next day.",
                "Salt brings out the flavor of vegetables."],
    "animals": ["Many birds migrate south in autumn.", "Foxes are most active at dusk.",
                "Frogs breathe partly through their skin."],
    "programming": ["A compiler turns source code into machine code.",
                    "Tests catch bugs before users do.",
                    "A variable stores a value for later use."],
    "music": ["A string vibrates faster when it is tighter.",
              "Folk songs are passed down by ear.", "A choir blends many voices into one."],
}

QUERIES = [
    ("q-capital", "What is the capital of Valmora?", " The capital of Valmora is Tessin."),
    ("q-moons", "How many moons does Corrin have?", " Corrin has eleven moons."),
    ("q-recipe", "What goes into kolva bread?", " Kolva bread is made with pine honey."),
    ("q-creator", "Who created the Wren language?", " Wren was created by Li Na Foss."),
    ("q-strings", "How many strings does the oru lute have?", " The oru lute has five strings."),
]


def main() -> None:
    rng = random.Random(0)
    docs = []
    for topic, facts in FACTS.items():
        for s, rel, o in facts:
            for v, tmpl in enumerate(PHRASINGS[rel]):
                text = tmpl.format(s=s, S=s[0].upper() + s[1:], s2=s, o=o)
                docs.append({"id": f"{topic}/{s.replace(' ', '-')}/{v}", "topic": topic,
                             "text": text[0].upper() + text[1:]})
        for d, text in enumerate(DISTRACTORS[topic]):
            docs.append({"id": f"{topic}/general/{d}", "topic": topic, "text": text})
    rng.shuffle(docs)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    with open(OUT / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"id": i, "prompt": p, "completion": c}) + "\n"
                     for i, p, c in QUERIES)
    print(f"{len(docs)} documents, {len(QUERIES)} queries -> {OUT}")


if __name__ == "__main__":
    main()
