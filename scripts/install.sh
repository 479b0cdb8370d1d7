#!/usr/bin/env bash
# One-time set-up, safe to re-run: a .venv with torch (2.13.0 CPU unless a torch is already there), then megalm
# with its test extras, building the megalm._C extension against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check setuptools wheel ninja
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
fi
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]"
# DeepSpeed ships as source: built against the torch above, hence after it and without build isolation
.venv/bin/python -c "import deepspeed" 2>/dev/null ||
  .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation "deepspeed==0.19.8"
# lm-eval, for the evaluation route on exported models (scripts/lm_eval_local.py)
.venv/bin/python -c "import lm_eval" 2>/dev/null ||
  .venv/bin/pip install -q --disable-pip-version-check "lm-eval[hf]"
# Slurm and munge (Debian's packages) for the launcher test under a real Slurm; it needs root to start them
if ! command -v slurmctld >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  else
    echo "scripts/install.sh: no Slurm (apt-get install slurm-wlm munge, as root): its launcher test will skip"
  fi
fi
# everything the suite needs must import now; a missing piece stops here, loudly, instead of skipping tests later
.venv/bin/python - <<'PY'
import importlib, sys
missing = []
for name in ("torch", "megalm._C", "megalm._bpe", "deepspeed", "lm_eval", "transformers", "megatron.core", "tiktoken",
             "sentencepiece", "matplotlib", "wandb", "torchao.float8", "jinja2", "peft", "trl"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # an extension can fail with other errors than ImportError
        missing.append(f"{name}: {type(exc).__name__}: {exc}")
if missing:
    sys.exit("scripts/install.sh: these did not install or do not import:\n  " + "\n  ".join(missing))
print("scripts/install.sh: megalm._C, megalm._bpe, deepspeed, lm_eval, transformers, megatron.core, torchao, peft, "
      "trl import")
PY
