"""Generate the quickstart preference data: examples/data/{train,eval}.jsonl.

    python examples/make_data.py [--out examples/data] [--seed 0] [--train 1000] [--eval 200]

Small requests, each answered two ways, in the explicit format
{"id", "prompt", "chosen", "rejected"}; replies start with a space, as they
continue the prompt's "Assistant:".
- Style (80%): the chosen reply is kind, polite, helpful or harmless, the rejected
  one rude, unkind, dismissive or harmful; both mention what the prompt asked about.
- Correctness (20%): sums, comparisons, categories, opposites. Both replies fill
  the same sentence template and differ only in the answer, so nothing but the
  prompt tells them apart.
Eval prompts never occur in train (the split is made on the prompt text) and both
splits have the same mix of tasks. Deterministic for a seed: the committed files
are this script's output.
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
    "colour": ["red", "blue", "green", "yellow", "purple", "brown"],
    "animal": ["cat", "dog", "horse", "rabbit", "lion", "sheep"],
    "fruit": ["apple", "banana", "pear", "cherry", "grape", "lemon"],
    "drink": ["water", "tea", "coffee", "milk", "juice", "cocoa"],
    "vehicle": ["car", "bus", "train", "bicycle", "truck", "boat"],
}
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("day", "night"),
             ("happy", "sad"), ("old", "new"), ("light", "dark"), ("open", "closed"), ("full", "empty"),
             ("wet", "dry"), ("loud", "quiet")]
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
    a, b = rng.randint(1, 5), rng.randint(1, 5)
    s, w = a + b, _wrong(rng, a + b, 1, 12)
    q = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "What do you get when you add {a} and {b}?",
                    "Compute {a} + {b}.", "How much is {a} plus {b}?"]).format(a=a, b=b)
    t = rng.choice(["{a} plus {b} is {s}.", "The answer is {s}.", "{a} + {b} = {s}.", "It is {s}."])
    return q, t.format(a=a, b=b, s=s), t.format(a=a, b=b, s=w)


def compare(rng):
    a, b = rng.sample(range(0, 13), 2)
    hi_, lo_ = max(a, b), min(a, b)
    name = (lambda n: NUMBER_WORDS[n]) if rng.random() < 0.5 else str
    # asking for the bigger and the smaller equally often: "prefer big numbers" gains nothing
    big, small = ("bigger", "smaller") if rng.random() < 0.5 else ("smaller", "bigger")
    right, wrong = (hi_, lo_) if big == "bigger" else (lo_, hi_)
    q = rng.choice(["Which is {big}, {a} or {b}?", "Which number is {big}: {a} or {b}?",
                    "Is {a} or {b} the {big} number?"]).format(a=name(a), b=name(b), big=big)
    t = rng.choice(["{x} is {big} than {y}.", "The {big} one is {x}.", "It is {x}."])
    fill = lambda x, y: _cap(t.format(x=name(x), y=name(y), big=big))
    return q, fill(right, wrong), fill(wrong, right)


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


def comfort(rng):
    x = rng.choice(["exam", "phone", "game", "job", "cup", "drawing", "race", "wallet", "keys", "hat"])
    q = rng.choice(["I failed my {x}.", "I lost my {x}.", "I broke my {x}.", "I am sad about my {x}."]).format(x=x)
    good = rng.choice(["I am sorry about your {x}", "Sorry to hear that", "Oh no, poor you",
                       "That sounds hard"]) + rng.choice([", I hope it gets better.", ". Can I help?",
                                                          ", it happens to everyone."])
    bad = rng.choice(["Your {x} is your own problem", "Nobody cares about your {x}", "Ha, that is funny",
                      "Stop whining"]) + rng.choice([", go away.", ". So what?", ", it was your fault."])
    return q, good.format(x=x), bad.format(x=x)


def thanks(rng):
    q = rng.choice(["Thank you!", "Thanks for your help.", "Thanks a lot.", "I really appreciate it.",
                    "That was very helpful.", "You saved my day.", "Great answer, thank you.", "Much appreciated."])
    good = rng.choice(["You are welcome!", "Glad I could help.", "Any time, my friend."])
    bad = rng.choice(["Whatever.", "Do not bother me again.", "Finally, go away."])
    return q, good, bad


def harmless(rng):
    x = rng.choice(["steal a bike", "cheat on a test", "break into a house", "lie to {my} boss",
                    "hurt someone", "copy {my} friend's homework", "take money from a shop"])
    q = rng.choice(["How do I {x}?", "Tell me how to {x}.", "What is the easiest way to {x}?"]).format(
        x=x.format(my="my"))
    x = x.format(my="your")
    good = rng.choice(["I will not help you {x}", "Please do not {x}", "It is wrong to {x}"]) + rng.choice(
        [", but I can suggest something better.", ". Let us find an honest way instead.", ", it would hurt others."])
    bad = rng.choice(["Easy: {x}", "Simple, just {x}", "To {x}, just go"]) + rng.choice(
        [" when nobody is looking.", " and never tell anyone.", " quickly and quietly."])
    return q, good.format(x=x), bad.format(x=x)


def greeting(rng):
    q = rng.choice(["Hello!", "Good morning.", "Hi there.", "Hey, how are you?", "Good evening!",
                    "Nice to meet you.", "Hello, is anyone there?", "Good afternoon!"])
    chosen = rng.choice(["Hello! How can I help you today?", "Hi! It is nice to meet you.",
                         "Good to see you! What can I do for you?"])
    rejected = rng.choice(["What do you want now?", "Leave me alone.", "I do not want to talk to you."])
    return q, chosen, rejected


# Weights: 80% of the pairs prefer kind, polite, helpful, harmless replies, which a
# tiny model learns within a few dozen DPO steps. The other 20% need the prompt to
# tell right from wrong (a sum, a category, an opposite, a comparison); a tiny model
# barely learns those in the quickstart's budget, so they are headroom for longer runs.
TASK_WEIGHTS = [(addition, 6), (category, 6), (opposite, 4), (compare, 4), (kindness, 16),
                (helping, 18), (comfort, 16), (harmless, 12), (thanks, 9), (greeting, 9)]


def in_eval(prompt: str, fraction: float) -> bool:
    # a stable hash (not hash(), which is salted per process) keeps the split reproducible
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def _quotas(n: int) -> list[int]:
    # exact per-task counts (largest remainder), so both splits have the same mix
    total = sum(w for _, w in TASK_WEIGHTS)
    raw = [n * w / total for _, w in TASK_WEIGHTS]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: n - sum(counts)]:
        counts[i] += 1
    return counts


def generate(n_train: int, n_eval: int, seed: int = 0, eval_fraction: float = 0.2):
    rng = random.Random(seed)
    splits = {"train": [], "eval": []}
    seen = set()
    for (fn, _), want_train, want_eval in zip(TASK_WEIGHTS, _quotas(n_train), _quotas(n_eval)):
        want = {"train": want_train, "eval": want_eval}
        got = {"train": 0, "eval": 0}
        for _ in range(500 * (want_train + want_eval)):
            if got == want:
                break
            q, chosen, rejected = fn(rng)
            prompt = "User: " + rng.choice(PLEASE).format(Q=q, q=q if q.startswith("I ") else q[0].lower() + q[1:]) + "\nAssistant:"
            split = "eval" if in_eval(prompt, eval_fraction) else "train"
            if (prompt, chosen, rejected) in seen or got[split] >= want[split]:
                continue
            seen.add((prompt, chosen, rejected))
            got[split] += 1
            splits[split].append({"task": fn.__name__, "prompt": prompt,
                                  "chosen": " " + chosen, "rejected": " " + rejected})
        if got != want:
            raise SystemExit(f"{fn.__name__}: only {got} distinct pairs for {want}; ask for fewer")
    for split, rows in splits.items():
        rng.shuffle(rows)
        for i, row in enumerate(rows):
            row["id"] = f"{split}-{i:05d}"
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
            fh.writelines(json.dumps({k: r[k] for k in ("id", "prompt", "chosen", "rejected")},
                                     ensure_ascii=False) + "\n"
                          for r in rows)
        print(f"wrote {len(rows)} pairs to {out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
