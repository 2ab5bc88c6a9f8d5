"""Generate the quickstart preference data: examples/data/{train,eval}.jsonl.

    python examples/make_data.py [--out examples/data] [--seed 0] [--train 1000] [--eval 200]

Small requests answered two ways. The chosen reply is correct, kind or helpful;
the rejected one is built from the same sentence template but is wrong, unkind or
unhelpful, so length and phrasing give nothing away and the model has to learn
the content (a sum, which number is bigger, which word names a colour, ...).
Eval prompts never occur in train: the split is made on the prompt text.
Deterministic for a seed: the committed files are this script's output.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"]
CATEGORIES = {
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "white", "black"],
    "animal": ["cat", "dog", "horse", "rabbit", "lion", "tiger", "mouse", "sheep", "goat", "whale"],
    "fruit": ["apple", "banana", "pear", "cherry", "grape", "lemon", "mango", "peach", "plum", "melon"],
    "drink": ["water", "tea", "coffee", "milk", "juice", "cocoa", "soda", "lemonade"],
    "vehicle": ["car", "bus", "train", "bicycle", "truck", "boat", "plane", "tram"],
    "shape": ["circle", "square", "triangle", "oval", "star", "hexagon", "rectangle"],
    "instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "harp"],
}
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("day", "night"),
             ("happy", "sad"), ("old", "new"), ("light", "dark"), ("open", "closed"), ("full", "empty"),
             ("early", "late"), ("wet", "dry"), ("hard", "soft"), ("loud", "quiet"), ("rich", "poor"),
             ("left", "right"), ("high", "low"), ("long", "short"), ("thick", "thin"), ("win", "lose")]
SUBJECTS = ["cats", "dogs", "teachers", "nurses", "gardens", "books", "rainy days", "my neighbours",
            "birds", "libraries", "bakers", "the ocean", "old friends", "trees", "musicians", "farmers"]
KIND = ["wonderful", "gentle", "lovely", "kind", "delightful", "brilliant", "warm", "charming", "wise"]
UNKIND = ["awful", "boring", "useless", "nasty", "dreadful", "stupid", "annoying", "ugly", "lazy"]
TASKS = ["fix {my} bike", "write a poem", "plan a trip", "bake a cake", "learn to swim", "clean {my} room",
         "study for a test", "find {my} keys", "paint a fence", "cook dinner", "tie {my} shoes",
         "water the plants", "pack {my} bag", "read a map"]
POLITE = ["Of course", "Sure", "Happy to help", "Certainly", "Gladly", "With pleasure"]
RUDE = ["No", "Ugh", "Not my problem", "Go away", "Whatever", "Do not ask me"]
PLEASE = ["{Q}", "Please, {q}", "{Q} Thanks!", "Quick question: {q}", "Hi! {Q}"]


def _an(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _cap(text):
    return text[0].upper() + text[1:]


def _wrong(rng, right, lo, hi):
    return rng.choice([v for v in range(lo, hi + 1) if v != right and abs(v - right) <= 3])


def addition(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    s, w = a + b, _wrong(rng, a + b, 0, 18)
    q = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "What do you get when you add {a} and {b}?",
                    "Compute {a} + {b}.", "How much is {a} plus {b}?"]).format(a=a, b=b)
    t = rng.choice(["{a} plus {b} is {s}.", "The answer is {s}.", "{a} + {b} = {s}.", "It is {s}."])
    return q, t.format(a=a, b=b, s=s), t.format(a=a, b=b, s=w)


def compare(rng):
    a, b = rng.sample(range(0, 13), 2)
    hi_, lo_ = max(a, b), min(a, b)
    words = rng.random() < 0.5
    name = (lambda n: NUMBER_WORDS[n]) if words else str
    q = rng.choice(["Which is bigger, {a} or {b}?", "Which number is larger: {a} or {b}?",
                    "Is {a} or {b} the bigger number?"]).format(a=name(a), b=name(b))
    t = rng.choice(["{x} is bigger than {y}.", "The bigger one is {x}.", "{x} is larger."])
    return q, _cap(t.format(x=name(hi_), y=name(lo_))), _cap(t.format(x=name(lo_), y=name(hi_)))


def category(rng):
    cat = rng.choice(sorted(CATEGORIES))
    other = rng.choice([c for c in sorted(CATEGORIES) if c != cat])
    good, bad = rng.choice(CATEGORIES[cat]), rng.choice(CATEGORIES[other])
    q = rng.choice(["Name {a}.", "Can you tell me {a}?", "Give me an example of {a}.",
                    "What is one {c} you know?", "Tell me the name of {a}."]).format(a=_an(cat), c=cat)
    t = rng.choice(["{X} is {a}.", "Sure: {x}.", "One {c} is {x}.", "How about {x}?"])
    fill = lambda w: t.format(x=w, X=w.capitalize(), a=_an(cat), c=cat)
    return q, fill(good), fill(bad)


def opposite(rng):
    w, o = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        w, o = o, w
    wrong = rng.choice([x for p in OPPOSITES for x in p if x not in (w, o)])
    q = rng.choice(["What is the opposite of {w}?", "Give me the opposite of {w}.",
                    "What word means the opposite of {w}?"]).format(w=w)
    t = rng.choice(["The opposite of {w} is {x}.", "It is {x}.", "{X}."])
    fill = lambda x: t.format(w=w, x=x, X=x.capitalize())
    return q, fill(o), fill(wrong)


def kindness(rng):
    s = rng.choice(SUBJECTS)
    k, u = rng.sample(KIND, 2), rng.sample(UNKIND, 2)
    q = rng.choice(["Say something kind about {s}.", "Can you say something nice about {s}?",
                    "Tell me what you like about {s}."]).format(s=s)
    t = rng.choice(["{S} are {a} and {b}.", "I think {s} are {a}.", "{S} are so {a}!"])
    fill = lambda a, b: t.format(s=s, S=_cap(s), a=a, b=b)
    return q, fill(*k), fill(*u)


def helping(rng):
    task = rng.choice(TASKS)
    q = rng.choice(["Can you help me {t}?", "Will you help me {t}?", "I need help to {t}.",
                    "Could you show me how to {t}?"]).format(t=task.format(my="my"))
    task = task.format(my="your")
    style = rng.randrange(3)
    if style == 0:
        return q, f"{rng.choice(POLITE)}, I will help you {task}.", f"{rng.choice(RUDE)}, I will not help you {task}."
    if style == 1:
        return q, f"{rng.choice(POLITE)}! Let us {task} together.", f"{rng.choice(RUDE)}. {_cap(task)} by yourself."
    return q, f"{rng.choice(POLITE)}. First, let me explain the steps.", f"{rng.choice(RUDE)}. Figure it out yourself."


def greeting(rng):
    q = rng.choice(["Hello!", "Good morning.", "Hi there.", "Hey, how are you?", "Good evening!"])
    chosen = rng.choice(["Hello! How can I help you today?", "Hi! It is nice to meet you.",
                         "Good to see you! What can I do for you?"])
    rejected = rng.choice(["What do you want now?", "Leave me alone.", "I do not want to talk to you."])
    return q, chosen, rejected


# weights: the harder tasks (arithmetic, comparison) are a third of the data
TASK_WEIGHTS = [(addition, 20), (compare, 12), (category, 20), (opposite, 14), (kindness, 14),
                (helping, 14), (greeting, 6)]


def in_eval(prompt: str, fraction: float) -> bool:
    # a stable hash (not hash(), which is salted per process) keeps the split reproducible
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def generate(n_train: int, n_eval: int, seed: int = 0, eval_fraction: float = 0.2):
    rng = random.Random(seed)
    fns, weights = zip(*TASK_WEIGHTS)
    splits = {"train": [], "eval": []}
    want = {"train": n_train, "eval": n_eval}
    seen = set()
    for _ in range(200 * (n_train + n_eval)):
        if all(len(splits[s]) >= want[s] for s in splits):
            break
        fn = rng.choices(fns, weights)[0]
        q, chosen, rejected = fn(rng)
        prompt = "User: " + rng.choice(PLEASE).format(Q=q, q=q[0].lower() + q[1:]) + "\nAssistant:"
        split = "eval" if in_eval(prompt, eval_fraction) else "train"
        if (prompt, chosen, rejected) in seen or len(splits[split]) >= want[split]:
            continue
        seen.add((prompt, chosen, rejected))
        splits[split].append({"id": f"{split}-{len(splits[split]):05d}", "task": fn.__name__,
                              "prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    for s in splits:
        if len(splits[s]) < want[s]:
            raise SystemExit(f"only {len(splits[s])} distinct {s} pairs; ask for fewer")
    return splits


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--eval", type=int, default=200)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in generate(args.train, args.eval, args.seed).items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            # "task" stays out of the files: the format is exactly id/prompt/chosen/rejected
            fh.writelines(json.dumps({k: v for k, v in r.items() if k != "task"}, ensure_ascii=False) + "\n"
                          for r in rows)
        print(f"wrote {len(rows)} pairs to {out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
