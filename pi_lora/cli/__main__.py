"""`python -m pi_lora.cli`: the same entry point as the `pi-lora` script."""

from pi_lora.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
