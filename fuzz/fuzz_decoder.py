"""Coverage-guided fuzz target (atheris, libFuzzer) for the frame decoder;
the property is decoder_property.check.

    python -m venv .venv && .venv/bin/pip install -r requirements-fuzz.txt
    .venv/bin/python fuzz/fuzz_decoder.py -max_total_time=60 fuzz/corpus

Any libFuzzer flag works; a failing input is written to crash-*.
"""

import os
import sys

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "fuzz")]

with atheris.instrument_imports():
    from decoder_property import check


def main() -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
