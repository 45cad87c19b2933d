import os
import sys

# the tests import their independent references (reference.py) by name
sys.path.insert(0, os.path.dirname(__file__))
