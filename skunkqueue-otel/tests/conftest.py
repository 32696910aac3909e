import sys
from pathlib import Path

# The job module the tests fire and the pools they start import (skunq work --path here).
HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
