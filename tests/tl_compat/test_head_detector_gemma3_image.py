"""TransformerLens' head-detector tests (ported in _head_detector_body.py) on the toy gemma3, image input."""
from pathlib import Path

FAMILY, KIND = "gemma3", "image"
exec(compile((Path(__file__).parent / "_head_detector_body.py").read_text(), "_head_detector_body.py", "exec"))
