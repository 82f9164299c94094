"""TransformerLens' head-detector tests (ported in _head_detector_body.py) on the toy qwen2_5_vl, text input."""
from pathlib import Path

FAMILY, KIND = "qwen2_5_vl", "text"
exec(compile((Path(__file__).parent / "_head_detector_body.py").read_text(), "_head_detector_body.py", "exec"))
