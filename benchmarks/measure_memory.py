"""Peak memory of real pi-lora training steps, next to what `pi-lora plan` predicts.

    python benchmarks/measure_memory.py                 # the CI matrix, markdown table
    python benchmarks/measure_memory.py --slow          # + bf16 rows and SmolLM2 (256-4096)
    python benchmarks/measure_memory.py --worker R.yaml # one measurement, one JSON line

The cases, the worker and the table live in benchmarks.plan_validation (tests/test_plan.py runs
them too); this is the same command as `python -m benchmarks.plan_validation`.
"""

from __future__ import annotations

import sys

from benchmarks.plan_validation import main

if __name__ == "__main__":
    sys.exit(main())
