"""`pi-lora plan`: will a recipe fit, how long will it take, what will it cost; offline.

Public API: `plan_recipe(recipe, device, gpus=, nodes=)` -> `Plan`; `render_table(plan)`;
`plan_to_dict(plan)`; `get_device(name)`, `cpu_device()`, `GPUS`. The memory model is
validated against measured peaks by tests/test_plan.py (docs/plan.md has the table).
This file only re-exports: `Plan` and `plan_recipe` live in planner.py, rendering in render.py.
"""

from __future__ import annotations

from pi_lora.plan.compute import FORMULA
from pi_lora.plan.devices import GPUS, Device, cpu_device, device_names, get_device, gpu_like
from pi_lora.plan.planner import Plan, Recommendation, plan_recipe
from pi_lora.plan.render import plan_to_dict, render_table

__all__ = [
    "FORMULA",
    "GPUS",
    "Device",
    "Plan",
    "Recommendation",
    "cpu_device",
    "device_names",
    "get_device",
    "gpu_like",
    "plan_recipe",
    "plan_to_dict",
    "render_table",
]
