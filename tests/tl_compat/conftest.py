"""tests/ on sys.path for the ports' shared helpers (_tl_models, _tl_ports)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: _tl_models
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/tl_compat: _tl_ports
