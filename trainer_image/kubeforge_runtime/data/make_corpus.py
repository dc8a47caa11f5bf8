"""Generate the bundled corpus (``data/corpus/*.txt``): deterministic synthetic English.

Nothing is downloaded and nothing is copied, so the text carries no licence question. It
has learnable structure at several scales (spelling, grammar templates, recurring facts,
simple arithmetic) so a tiny model's loss falls visibly within tens of steps, which is what
the tests and examples need. Regenerate with ``python -m kubeforge_runtime.data.make_corpus``;
the output is byte-identical for the same seed.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

NAMES = ["Ada", "Boris", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kira", "Lars",
         "Mina", "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Vera", "Wen", "Yusuf"]
PLACES = ["the harbour", "the old mill", "the library", "the market", "the river bank", "the north field",
          "the workshop", "the station", "the orchard", "the lighthouse", "the bakery", "the school"]
THINGS = ["a lantern", "a map", "three apples", "a wooden box", "a letter", "a compass", "a basket of bread",
          "a small engine", "a red scarf", "a book of songs", "a bag of nails", "a kettle"]
VERBS = ["carried", "found", "repaired", "painted", "sold", "borrowed", "hid", "returned", "weighed", "opened"]
TIMES = ["in the morning", "at noon", "in the evening", "before the rain", "after supper", "at dawn",
         "on Sunday", "during the storm"]
ADJ = ["quiet", "busy", "cold", "bright", "narrow", "crowded", "empty", "warm"]
FACTS = [
    "Water boils at one hundred degrees at sea level.",
    "The river runs from the hills to the sea.",
    "A week has seven days and a year has twelve months.",
    "The mill grinds wheat into flour.",
    "The lighthouse keeper lights the lamp at dusk.",
    "Bread is baked before sunrise.",
]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def sentence(rng: random.Random) -> str:
    kind = rng.random()
    a, b = rng.sample(NAMES, 2)
    if kind < 0.35:
        return f"{a} {rng.choice(VERBS)} {rng.choice(THINGS)} at {rng.choice(PLACES)} {rng.choice(TIMES)}."
    if kind < 0.55:
        return f"{a} gave {rng.choice(THINGS)} to {b}, and {b} thanked {a}."
    if kind < 0.7:
        return f"{rng.choice(PLACES).capitalize()} was {rng.choice(ADJ)} {rng.choice(TIMES)}."
    if kind < 0.85:
        x, y = rng.randint(0, 5), rng.randint(0, 5)
        return f"{a} counted {NUMBERS[x]} and {NUMBERS[y]} more, which makes {NUMBERS[x + y]}."
    if kind < 0.93:
        return rng.choice(FACTS)
    return f"\"Where is {rng.choice(THINGS)}?\" asked {a}. \"At {rng.choice(PLACES)},\" said {b}."


def paragraph(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 8)))


def write_corpus(out: Path, files: int = 8, chars_per_file: int = 120_000, seed: int = 1234) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(files):
        rng = random.Random(f"{seed}/{i}")
        parts: list[str] = []
        size = 0
        while size < chars_per_file:
            p = paragraph(rng)
            parts.append(p)
            size += len(p) + 2
        path = out / f"stories-{i:02d}.txt"
        path.write_text("\n\n".join(parts) + "\n")
        written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "corpus")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    for p in write_corpus(args.out, seed=args.seed):
        print(p, p.stat().st_size)


if __name__ == "__main__":
    main()
