"""Stage scripts shared by the Slurm engine tests and the Slurm service tests."""

# A model stage that allocates (and touches) more memory than the job was given.
HUNGRY_MODEL = '''
def train(runtime, options, ctx):
    hoard = bytearray(600 << 20)
    for i in range(0, len(hoard), 4096):
        hoard[i] = 1
'''


# A model stage that reports which fake GPU nodes it can see.
GPU_MODEL = '''
import json, os

def train(runtime, options, ctx):
    seen = sorted(n for n in os.listdir("/dev") if n.startswith("fakegpu"))
    with open(os.path.join(runtime.read_model(), "gpus.json"), "w") as f:
        json.dump(seen, f)
'''
