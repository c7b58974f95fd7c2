"""Broken or malicious scripts get a clear one-paragraph error naming the stage,
the script and the cause, on every backend, quickly, with nothing left behind.

(tests/test_run_e2e.py has the plain cases on bwrap: a syntax error in the
model, a missing datasource entry, a set in a sample. These are the nastier
relatives, on both backends.)
"""
from __future__ import annotations

import pytest

from .attack import assert_contained_failure, run_attack

pytestmark = pytest.mark.hostile

POOL = '''
from sandbox import sdk
{prelude}
def datasource(options, ctx):
    return sdk.from_lists(train=[{{"data": {data}, "label": 0}}], meta={{"type": "general"}})
'''

SAMPLES = {
    # name: (prelude, data expression, words the error must hold)
    "pickle bait": ("class Evil:\n    def __reduce__(self):\n        import os\n        return (os.system, ('id',))\n",
                    "Evil()", ["Evil", "cannot cross a sandbox boundary"]),
    "object array": ("import numpy as np\n", "np.array([object(), 1], dtype=object)",
                     ["numpy array of dtype object", "cannot cross"]),
    "structured array": ("import numpy as np\n", "np.zeros(2, dtype=[('a', 'i4'), ('b', 'O')])",
                         ["cannot cross"]),
    "self-referencing dict": ("loop = {}\nloop['me'] = loop\n", "loop", ["datasource"]),
    "deeply nested list": ("deep = []\nfor _ in range(100000):\n    deep = [deep]\n", "deep", ["datasource"]),
    "int past 64 bits": ("", "2 ** 70", ["int outside the 64-bit range"]),
    # msgpack packs a tuple key as an array, which the next stage cannot make a dict key of:
    # the stage that sent it is named, not the one that could not read it.
    "tuple key": ("", "{(1, 2): 3}", ["could not read", "a dict key that is a list, tuple or dict"]),
    "generator": ("", "(i for i in range(3))", ["generator", "cannot cross"]),
    "function": ("", "print", ["builtin_function_or_method", "cannot cross"]),
}


@pytest.mark.parametrize("case", list(SAMPLES))
def test_a_sample_outside_the_contract_is_refused_at_the_boundary(tmp_path, isolation, case):
    prelude, data, words = SAMPLES[case]
    attack = run_attack(tmp_path, isolation, datasource=POOL.format(prelude=prelude, data=data), dataflow=[])
    assert_contained_failure(attack, "datasource", "(datasource.py)", *words, within=40)
    assert not attack.leftovers()


BROKEN = {
    # name: (which script, source, words the error must hold)
    "syntax error in a dataflow": ("dataflow", "def dataflow(pool, options, ctx)\n    return pool\n",
                                   ["stage 'dataflow-1' (dataflow1.py)", "syntax error at line 1"]),
    "no train entry": ("model", "def predict(runtime, options, ctx):\n    return []\n",
                       ["stage 'model' (model.py)", "has no function 'train'"]),
    "entry that is not callable": ("model", "train = 42\n", ["stage 'model' (model.py)", "has no function 'train'"]),
    "SystemExit at import": ("model", "raise SystemExit(0)\n",
                             ["stage 'model' (model.py)", "failed while being imported", "SystemExit"]),
    "exception at import": ("datasource", "import no_such_module_anywhere\n",
                            ["stage 'datasource' (datasource.py)", "ModuleNotFoundError", "no_such_module_anywhere"]),
    "KeyboardInterrupt in train": ("model", "def train(runtime, options, ctx):\n    raise KeyboardInterrupt\n",
                                   ["stage 'model' (model.py)"]),
    "os._exit(0) in train": ("model", "import os\ndef train(runtime, options, ctx):\n    os._exit(0)\n",
                             ["stage 'model' (model.py)"]),
    "datasource returns None": ("datasource", "def datasource(options, ctx):\n    return None\n",
                                ["stage 'datasource' (datasource.py)", "not a pool"]),
    "closes every descriptor": ("model", "import os\ndef train(runtime, options, ctx):\n    os.closerange(3, 65536)\n"
                                "    runtime.log_metrics(x=1)\n", ["stage 'model' (model.py)"]),
    "a pool whose dataset lies": ("datasource", '''
class Liar:
    meta = {"type": "general"}
    train = test = valid = predicted = None
    def __init__(self):
        class D:
            def __len__(self): return 10 ** 12
            def __iter__(self): return iter(())
            def next(self): raise MemoryError("no")
            def next_batch(self, n): raise RuntimeError("lying dataset")
            def seek(self, pos): pass
            def shuffle(self, seed=None): pass
        self.train = D()
def datasource(options, ctx):
    return Liar()
''', ["datasource"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_script_is_named_with_its_cause(tmp_path, isolation, case):
    where, source, words = BROKEN[case]
    scripts = {"dataflow": [source]} if where == "dataflow" else {where: source}
    attack = run_attack(tmp_path, isolation, **scripts)
    assert attack.returncode == 1, attack.describe()
    for word in words:
        assert word in attack.error, f"{word!r} not in the error\n{attack.describe()}"
    assert "Traceback" not in attack.stderr and "internal error" not in attack.stderr, attack.describe()
    assert attack.elapsed < 40, attack.describe()
    assert not attack.leftovers()
