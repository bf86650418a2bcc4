import os
import sys

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
sys.path.insert(0, FIXTURES)  # random_weights.py, shared with make_fixtures.py

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
