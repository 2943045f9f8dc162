"""python -m runtime --model DIR --image IMG --prompt TEXT (see runtime/cli.py or --help)."""

import sys

from runtime.cli import main

if __name__ == "__main__":
    sys.exit(main())
