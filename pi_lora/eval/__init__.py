"""Evaluation of extended-context models: passkey retrieval, perplexity vs length, report.

Entry point: `pi_lora.eval.runner.run_eval(targets, settings, out_dir)`; model loading for
`pi-lora eval` lives in `pi_lora.eval.targets`.
"""
