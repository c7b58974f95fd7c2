"""Datasource: a generated corpus of product reviews, labelled by sentiment.

Without `url`, it writes three CSV files (columns `text,label`) into the
workspace's data dir and returns `sdk.from_csv(...)` over them:

    data/reviews/train.csv  `count` reviews per class (default 300)
    data/reviews/valid.csv  `validCount` per class (default count // 5)
    data/reviews/test.csv   `testCount` per class (default count // 3)

Labels: `negative`, `neutral`, `positive`. A review is one to three
sentences built from templates and a shared vocabulary (products, aspects,
filler sentences that carry no sentiment), with random casing and
punctuation. Some reviews mix: a positive or negative review may hold a
lukewarm sentence, a minor complaint or a small compliment; a neutral one
may weigh a compliment against a complaint. So a model has to weigh the
words rather than spot one. Everything is seeded: the same options
give the same files.

Options (query string): count, validCount, testCount, seed (default 11).
With `?url=...` it downloads that CSV (columns `text,label`) instead and
uses it as the train split (no validation/test split).
"""
import csv
import json
import os
import random

from sandbox import sdk

PRODUCTS = [
    "headphones", "blender", "backpack", "phone case", "desk lamp", "coffee maker", "keyboard",
    "running shoes", "water bottle", "tent", "vacuum cleaner", "monitor", "toaster", "jacket",
    "smart watch", "office chair", "kettle", "charger", "speaker", "frying pan", "camera", "mouse",
]
ASPECTS = [
    "battery life", "sound quality", "build quality", "design", "price", "packaging", "size",
    "material", "display", "handle", "finish", "fit", "performance", "weight", "colour",
]
POS_ADJ = ["great", "excellent", "fantastic", "superb", "outstanding", "wonderful", "impressive",
           "solid", "brilliant", "perfect", "amazing", "lovely"]
NEG_ADJ = ["terrible", "awful", "poor", "horrible", "disappointing", "flimsy", "useless", "cheap",
           "dreadful", "faulty", "bad", "shoddy"]
NEU_ADJ = ["okay", "average", "acceptable", "ordinary", "standard", "decent enough", "fine",
           "unremarkable", "reasonable", "so-so", "typical", "adequate"]
POS_PHRASES = [
    "highly recommend it", "would buy again", "it exceeded my expectations", "worth every penny",
    "i love it", "five stars from me", "my family loves it", "best purchase this year",
    "it works like a charm", "absolutely delighted with it", "very happy with this purchase",
    "it does everything i wanted and more",
]
NEG_PHRASES = [
    "would not recommend it", "it broke after a week", "complete waste of money", "i returned it",
    "i want a refund", "one star", "it stopped working in two days", "very unhappy with this purchase",
    "avoid this one", "it fell apart quickly", "never buying from them again", "it does not work at all",
]
NEU_PHRASES = [
    "it does the job", "nothing special", "it is as described", "it works as expected",
    "not great, not terrible", "it is fine for the price", "three stars", "it is what it is",
    "no strong feelings either way", "about what i expected", "it is neither good nor bad",
    "an average product overall",
]
FILLERS = [
    "i bought it last month", "i use it every day", "it arrived on tuesday", "this was a gift for my sister",
    "i ordered the blue one", "delivery took four days", "i have had it for two weeks", "my old one was from another brand",
    "i compared a few models before buying", "it came in a cardboard box", "i use it at work", "i got it on sale",
]
MINOR_NEG = ["the box was a bit damaged", "the manual is confusing", "delivery was slow", "the colour is slightly off"]
MINOR_POS = ["the colour is nice", "it arrived quickly", "the box looked nice", "the seller answered quickly"]

LABELS = ("negative", "neutral", "positive")


def _opt(options, key, default):
    value = options.get(key, default)
    if isinstance(value, list):
        value = value[-1] if value else default
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {key!r} must be an integer, got {value!r}")


def _core(label, rng):
    """One sentence that carries the review's sentiment."""
    adj = rng.choice({"positive": POS_ADJ, "negative": NEG_ADJ, "neutral": NEU_ADJ}[label])
    phrase = rng.choice({"positive": POS_PHRASES, "negative": NEG_PHRASES, "neutral": NEU_PHRASES}[label])
    product, aspect = rng.choice(PRODUCTS), rng.choice(ASPECTS)
    templates = [
        f"the {aspect} of this {product} is {adj}",
        f"{adj} {product}, {phrase}",
        f"this {product} is {adj}",
        f"{phrase}",
        f"the {aspect} is {adj} and {phrase}",
        f"{adj} {aspect}",
        f"overall a {adj} {product}",
        f"i think the {product} is {adj}, {phrase}",
    ]
    return rng.choice(templates)


def review(label, rng):
    parts = [_core(label, rng)]
    if rng.random() < 0.5:
        parts.append(_core(label, rng))
    if rng.random() < 0.5:
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(FILLERS))
    if label != "neutral" and rng.random() < 0.3:
        parts.insert(rng.randrange(len(parts) + 1), _core("neutral", rng))
    if label == "neutral" and rng.random() < 0.25:
        # a balanced mixed review is neutral too
        parts.append(f"{rng.choice(POS_ADJ)} {rng.choice(ASPECTS)} but {rng.choice(NEG_ADJ)} {rng.choice(ASPECTS)}")
    if label == "positive" and rng.random() < 0.2:
        parts.append("but " + rng.choice(MINOR_NEG))
    if label == "negative" and rng.random() < 0.2:
        parts.append("although " + rng.choice(MINOR_POS))
    sentences = []
    for p in parts:
        if rng.random() < 0.7:
            p = p[0].upper() + p[1:]
        if rng.random() < 0.1:
            p = p.upper()
        sentences.append(p + rng.choice([".", ".", ".", "!", "!!", "...", ""]))
    return " ".join(sentences)


def generate(root, counts, seed):
    params = {"counts": counts, "seed": seed, "version": 2}
    marker = os.path.join(root, "generated.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == params:
                return
    os.makedirs(root, exist_ok=True)
    rng = random.Random(seed)
    for split, count in counts.items():
        rows = [(review(label, rng), label) for label in LABELS for _ in range(count)]
        rng.shuffle(rows)
        with open(os.path.join(root, f"{split}.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(params, f)


def datasource(options, ctx):
    url = options.get("url")
    if isinstance(url, list):
        url = url[-1]
    if url:
        return sdk.from_csv(train=ctx.download(url), label="label", meta={"type": "text"})

    count = _opt(options, "count", 300)
    counts = {
        "train": count,
        "valid": _opt(options, "validCount", max(1, count // 5)),
        "test": _opt(options, "testCount", max(1, count // 3)),
    }
    if count < 1:
        raise ValueError("count must be >= 1")
    seed = _opt(options, "seed", 11)
    root = os.path.join(ctx.workspace.data_dir, "reviews")
    generate(root, counts, seed)
    return sdk.from_csv(
        train=os.path.join(root, "train.csv"),
        valid=os.path.join(root, "valid.csv"),
        test=os.path.join(root, "test.csv"),
        label="label",
        meta={"type": "text", "source": "generated reviews", "seed": seed},
    )
