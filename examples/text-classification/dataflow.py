"""Dataflow: normalise review text; `data` stays a string.

Accepts `data` as a string (what `predict -s` and `serve` give), bytes
(`predict -u review.txt`: decoded as UTF-8) or a CSV row dict (what the
datasource gives: the `text` column, else the first string column).
Lowercases, turns punctuation into spaces (apostrophes are dropped, so
"don't" becomes "dont") and collapses whitespace.

Options: `?lower=0` keeps the case (default: lowercase).
The label is left as it is; meta gets `text_normalised: true`.
"""
import re
import unicodedata

_PUNCT = re.compile(r"[^\w\s']+|_")
_SPACE = re.compile(r"\s+")


def _flag(options, key, default):
    value = options.get(key, default)
    if isinstance(value, list):
        value = value[-1] if value else default
    if value is None:
        return True  # a bare key (?lower) means on
    return str(value).strip().lower() not in ("0", "false", "no", "off", "")


def _text(data):
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data).decode("utf-8", errors="replace")
    if isinstance(data, dict):
        if "text" in data:
            return str(data["text"])
        for value in data.values():
            if isinstance(value, str):
                return value
        return " ".join(str(v) for v in data.values())
    if data is None:
        return ""
    return str(data)


def normalise(text, lower=True):
    text = unicodedata.normalize("NFKC", text)
    if lower:
        text = text.lower()
    text = text.replace("'", "").replace("\u2019", "")
    text = _PUNCT.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def dataflow(pool, options, ctx):
    lower = _flag(options, "lower", "1")

    def fn(sample):
        out = dict(sample)
        out["data"] = normalise(_text(sample.get("data")), lower)
        return out

    def meta_fn(meta):
        meta = dict(meta)
        meta["type"] = "text"
        meta["text_normalised"] = True
        return meta

    return pool.transform(fn, meta_fn)
