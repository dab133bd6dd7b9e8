import os
import sys

# make `from tests.tolerances import ...` and `from tolerances import ...` both work
sys.path.insert(0, os.path.dirname(__file__))
