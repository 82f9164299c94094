# Ported from TransformerLens (https://github.com/TransformerLensOrg/TransformerLens, MIT licence),
# tests/integration/test_head_detector.py at 4cd36aae. Assertions unchanged; changed: the model (a
# shipped toy, FAMILY/KIND set by the test_head_detector_*.py file that runs this body), the input
# (toy words; with KIND == "image" a toy scene before the text, see `detect_head` below), and the
# expected scores, which TL hard-codes for solu-2l and are computed here by hand (`_reference`).
import functools
import math

import pytest
import torch
from _tl_models import toy_model
from _tl_ports import make_input, n_tokens

pytestmark = pytest.mark.slow  # port: hundreds of forwards

from transformer_lens.head_detector import detect_head as tl_detect_head
from transformer_lens.head_detector import (
    HEAD_NAMES,
    ErrorMeasure,
    detect_head,
    get_duplicate_token_head_detection_pattern,
    get_induction_head_detection_pattern,
    get_previous_token_head_detection_pattern,
)

ATOL = 1e-4  # Absolute tolerance - how far does a float have to be before we consider it no longer equal?
# ATOL is set to 1e-4 because the tensors we check on are also to 4 decimal places.

model = toy_model(FAMILY, fold_ln=True)
# the toy tokenizer is word-level: one token per word, as TL's sequences have (toy words)
test_regular_sequence = " red circle square"  # Four tokens including BOS
test_duplicated_sequence = " blue circle square blue circle square"
test_duplicated_sequence2 = " one two three one two three"
test_regular_sequence_padded = " large large large green cross small"
test_duplicated_seq_len = n_tokens(model, make_input(model, KIND, test_duplicated_sequence))


@functools.lru_cache(maxsize=None)
def _cache_of(seq):
    """One run per sequence (TL's detect_head would rerun it for every call): the cache of the
    model's run on this test's input, without batch dim, as TL's detect_head makes it."""
    with torch.no_grad():
        return model.run_with_cache(make_input(model, KIND, seq), remove_batch_dim=True)[1]


def detect_head(model, seq, *args, cache=None, **kwargs):
    """TL's detect_head, given the (memoised) cache of ``seq``. With an image (KIND == "image")
    the sequence is a batch of one toy scene + the text (TL's detector tokenizes text and
    runs the model on the ids alone, which cannot carry the pixels). A list of sequences
    goes to TL's own list path for text; with an image each is scored and averaged, as TL's
    list path does. An empty or over-long text is passed as is (no image, no cache)."""
    if isinstance(seq, list):
        if KIND == "text":
            return tl_detect_head(model, seq, *args, cache=cache, **kwargs)
        assert cache is None
        return torch.stack([detect_head(model, s, *args, **kwargs) for s in seq]).mean(0)
    if not isinstance(seq, str) or not seq.strip() or len(seq.split()) >= model.cfg.n_ctx:
        return tl_detect_head(model, seq, *args, cache=cache, **kwargs)
    return tl_detect_head(model, make_input(model, KIND, seq), *args, cache=cache or _cache_of(seq), **kwargs)


def _reference(seq, head_name, exclude_bos=False, exclude_current_token=False, error_measure="mul"):
    """The expected scores by hand (TL hard-codes solu-2l's): per head, the pattern's mass on
    the detection pattern over its total mass ("mul"), or 1 - sum |pattern - detection| / pos
    rounded to 3 decimals ("abs"), from the model's cached patterns."""
    inp = make_input(model, KIND, seq)
    ids = model.to_tokens(inp)[0].cpu()
    n = len(ids)
    prev = torch.zeros(n, n)
    prev[1:, :-1] = torch.eye(n - 1)
    dup = (ids[:, None] == ids[None, :]).float().tril(-1)
    ind = torch.zeros(n, n)
    ind[:, 1:] = dup[:, :-1]
    det = {"previous_token_head": prev, "duplicate_token_head": dup, "induction_head": ind.tril()}[head_name]
    cache = _cache_of(seq)
    out = torch.empty(model.cfg.n_layers, model.cfg.n_heads)
    for l in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            p = cache["pattern", l][h].float().cpu().clone()
            if error_measure == "mul":
                if exclude_bos:
                    p[:, 0] = 0
                if exclude_current_token:
                    p.fill_diagonal_(0)
                out[l, h] = (p * det).sum() / p.sum()
            else:
                d = (p - det).abs()
                if exclude_bos:
                    d[:, 0] = 0
                if exclude_current_token:
                    d.fill_diagonal_(0)
                out[l, h] = 1 - round(float(d.sum() / n), 3)
    return out


zeros_detection_pattern = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)

# --- markers of the port (the reasons were checked with scripts/tl_bridge_checks.py, which runs
# TransformerLens' own TransformerBridge on the same toy checkpoints) ---
_beartype_only = pytest.mark.xfail(strict=True, reason=(
    "needs TransformerLens' pytest option --jaxtyping-packages=transformer_lens,beartype.beartype: without it "
    "detect_head raises its own AssertionError for an unknown name, for any model (TL's bridge included)"))
_no_bos = pytest.mark.xfail(FAMILY == "qwen2_5_vl", strict=True, reason=(
    "counts a BOS token; Qwen2.5-VL prepends none: TL's own Qwen2.5-VL bridge sets default_prepend_bos=False "
    "and gives 3 tokens for ' red circle square' and 0 for '' (torch.eye(-1) fails), checked"))
_bidirectional = pytest.mark.xfail(FAMILY == "gemma3" and KIND == "image", strict=True, reason=(
    "the 'abs' measure asserts a lower-triangular pattern; Gemma3 attends bidirectionally inside an image "
    "block. TL's own Gemma3 bridge on the same input: upper-triangle attention mass 16.8 in layer 0 and the "
    "same AssertionError, checked"))
_repeats = pytest.mark.skipif(KIND == "image", reason=(
    "the expectation (zero) rests on the sequence having no repeated token; an image's placeholder tokens "
    "repeat, so it does not apply to the image input"))


expected_regular_sequence_previous_match_mul = _reference(test_regular_sequence, "previous_token_head")
expected_regular_sequence_previous_match_abs = _reference(test_regular_sequence, "previous_token_head", error_measure="abs")
expected_duplicated_sequence_previous_match_mul = _reference(test_duplicated_sequence, "previous_token_head")
expected_duplicated_sequence_previous_match_abs = _reference(test_duplicated_sequence, "previous_token_head", error_measure="abs")
expected_duplicated_sequence_duplicate_match_mul = _reference(test_duplicated_sequence, "duplicate_token_head")
expected_duplicated_sequence_duplicate_match_abs = _reference(test_duplicated_sequence, "duplicate_token_head", error_measure="abs")
expected_duplicated_sequence_induction_match_mul = _reference(test_duplicated_sequence, "induction_head")
expected_duplicated_sequence_induction_match_abs = _reference(test_duplicated_sequence, "induction_head", error_measure="abs")
expected_previous_exclude_bos_match_mul = _reference(test_regular_sequence, "previous_token_head", exclude_bos=True)
expected_previous_exclude_bos_match_abs = _reference(test_regular_sequence, "previous_token_head", exclude_bos=True, error_measure="abs")
expected_previous_exclude_current_token_match_mul = _reference(test_regular_sequence, "previous_token_head", exclude_current_token=True)
expected_previous_exclude_current_token_match_abs = _reference(test_regular_sequence, "previous_token_head", exclude_current_token=True, error_measure="abs")
expected_previous_exclude_bos_and_current_token_match_mul = _reference(test_regular_sequence, "previous_token_head", exclude_bos=True, exclude_current_token=True)
expected_previous_exclude_bos_and_current_token_match_abs = _reference(test_regular_sequence, "previous_token_head", exclude_bos=True, exclude_current_token=True, error_measure="abs")

# Successes
class Test_detect_head_successful:
    class Test_mul:
        @pytest.mark.parametrize(
            ("head_name", "expected"),
            (
                ("previous_token_head", expected_regular_sequence_previous_match_mul),
                pytest.param("duplicate_token_head", zeros_detection_pattern, marks=_repeats),
                pytest.param("induction_head", zeros_detection_pattern, marks=_repeats),
            ),
        )
        def test_regular_sequence(self, head_name, expected):
            result = detect_head(
                model,
                test_regular_sequence,
                detection_pattern=head_name,
                error_measure="mul",
            )
            assert torch.allclose(result, expected, atol=ATOL)

        @pytest.mark.parametrize(
            ("head_name", "expected"),
            (
                (
                    "previous_token_head",
                    expected_duplicated_sequence_previous_match_mul,
                ),
                (
                    "duplicate_token_head",
                    expected_duplicated_sequence_duplicate_match_mul,
                ),
                ("induction_head", expected_duplicated_sequence_induction_match_mul),
            ),
        )
        def test_duplicated_sequence(self, head_name, expected):
            result = detect_head(
                model,
                test_duplicated_sequence,
                detection_pattern=head_name,
                error_measure="mul",
            )
            assert torch.allclose(result, expected, atol=ATOL)

    @_bidirectional
    class Test_abs:
        @pytest.mark.parametrize(
            ("head_name", "expected"),
            (
                ("previous_token_head", expected_regular_sequence_previous_match_abs),
                pytest.param("duplicate_token_head", zeros_detection_pattern, marks=_repeats),
                pytest.param("induction_head", zeros_detection_pattern, marks=_repeats),
            ),
        )
        def test_regular_sequence(self, head_name, expected):
            result = detect_head(
                model,
                test_regular_sequence,
                detection_pattern=head_name,
                error_measure="abs",
            )
            assert torch.allclose(result, expected, atol=ATOL)

        @pytest.mark.parametrize(
            ("head_name", "expected"),
            (
                (
                    "previous_token_head",
                    expected_duplicated_sequence_previous_match_abs,
                ),
                (
                    "duplicate_token_head",
                    expected_duplicated_sequence_duplicate_match_abs,
                ),
                ("induction_head", expected_duplicated_sequence_induction_match_abs),
            ),
        )
        def test_duplicated_sequence(self, head_name, expected):
            result = detect_head(
                model,
                test_duplicated_sequence,
                detection_pattern=head_name,
                error_measure="abs",
            )
            assert torch.allclose(result, expected, atol=ATOL)


@pytest.mark.parametrize("head_name", HEAD_NAMES)
def test_batched_equal_lengths(head_name):
    result_regular_padded = detect_head(model, test_regular_sequence_padded, head_name)
    result_duplicated = detect_head(model, test_duplicated_sequence, head_name)
    result_duplicated2 = detect_head(model, test_duplicated_sequence2, head_name)
    result_batched = detect_head(
        model,
        [
            test_regular_sequence_padded,
            test_duplicated_sequence,
            test_duplicated_sequence2,
        ],
        head_name,
    )
    expected = (result_regular_padded + result_duplicated + result_duplicated2) / 3
    assert torch.allclose(result_batched, expected, atol=ATOL)


def test_batched_unequal_lengths():
    s1 = test_regular_sequence
    s2 = test_duplicated_sequence
    s3 = [s1, s2]
    r1 = detect_head(model, s1, "previous_token_head")
    r2 = detect_head(model, s2, "previous_token_head")
    r3 = detect_head(model, s3, "previous_token_head")

    assert torch.allclose(r3, (r1 + r2) / 2, atol=ATOL)


@pytest.mark.parametrize(
    "error_measure, expected",
    (
        ("mul", expected_previous_exclude_bos_match_mul),
        pytest.param("abs", expected_previous_exclude_bos_match_abs, marks=_bidirectional),
    ),
)
def test_detect_head_exclude_bos(error_measure: ErrorMeasure, expected: torch.Tensor):
    assert torch.allclose(
        detect_head(
            model,
            test_regular_sequence,
            "previous_token_head",
            exclude_bos=True,
            error_measure=error_measure,
        ),
        expected,
        atol=ATOL,
    )


@pytest.mark.parametrize(
    "error_measure, expected",
    (
        ("mul", expected_previous_exclude_current_token_match_mul),
        pytest.param("abs", expected_previous_exclude_current_token_match_abs, marks=_bidirectional),
    ),
)
def test_detect_head_exclude_current_token(error_measure: ErrorMeasure, expected: torch.Tensor):
    assert torch.allclose(
        detect_head(
            model,
            test_regular_sequence,
            "previous_token_head",
            exclude_current_token=True,
            error_measure=error_measure,
        ),
        expected,
        atol=ATOL,
    )


@pytest.mark.parametrize(
    "error_measure, expected",
    (
        ("mul", expected_previous_exclude_bos_and_current_token_match_mul),
        pytest.param("abs", expected_previous_exclude_bos_and_current_token_match_abs, marks=_bidirectional),
    ),
)
def test_detect_head_exclude_bos_and_current_token(
    error_measure: ErrorMeasure, expected: torch.Tensor
):
    assert torch.allclose(
        detect_head(
            model,
            test_regular_sequence,
            "previous_token_head",
            exclude_bos=True,
            exclude_current_token=True,
            error_measure=error_measure,
        ),
        expected,
        atol=ATOL,
    )


@pytest.mark.parametrize(
    "error_measure, expected",
    (
        ("mul", expected_regular_sequence_previous_match_mul),
        pytest.param("abs", expected_regular_sequence_previous_match_abs, marks=_bidirectional),
    ),
)
def test_detect_head_with_cache(error_measure: ErrorMeasure, expected: torch.Tensor):
    _, cache = model.run_with_cache(make_input(model, KIND, test_regular_sequence), remove_batch_dim=True)
    assert torch.allclose(
        detect_head(
            model,
            test_regular_sequence,
            "previous_token_head",
            cache=cache,
            error_measure=error_measure,
        ),
        expected,
        atol=ATOL,
    )


##########
# Errors #
##########


@_beartype_only
def test_detect_head_with_invalid_head_name():
    with pytest.raises(Exception) as e:
        detect_head(model, test_regular_sequence, "test")
    # Type checking can be done by jaxtyping (TypeCheckError) or beartype (BeartypeCallHintParamViolation)
    exc_name = type(e.value).__name__
    exc_msg = str(e.value).lower()
    assert "TypeCheckError" in exc_name or "Beartype" in exc_name
    # Check for meaningful error message (different formats for different type checkers)
    assert (
        "type-check" in exc_msg
        or "vector_type" in exc_msg
        or "detection_pattern" in exc_msg
        or "violates type" in exc_msg
    )


@_no_bos
def test_detect_head_with_zero_sequence_length():
    with pytest.raises(AssertionError) as e:
        detect_head(model, "", "previous_token_head")
    assert (
        str(e.value)
        == "The sequence must be non-empty and must fit within the model's context window."
    )


def test_detect_head_with_sequence_length_outside_context_window():
    with pytest.raises(AssertionError) as e:
        detect_head(model, "a " * model.cfg.n_ctx, "previous_token_head")
    assert (
        str(e.value)
        == "The sequence must be non-empty and must fit within the model's context window."
    )


def test_detect_head_with_invalid_detection_pattern():
    with pytest.raises(AssertionError) as e:
        detect_head(model, test_duplicated_sequence, torch.ones(4, 4))
    assert "The detection pattern must be a lower triangular" in str(e.value)


class Test_detect_head_non_lower_triangular_detection_pattern:
    detection_pattern = torch.tril(torch.ones(test_duplicated_seq_len, test_duplicated_seq_len))

    def test_no_error(self):
        detect_head(
            model,
            test_duplicated_sequence,
            self.detection_pattern.to(device=model.cfg.device),
        )
        assert True  # ugly, need to make a separate context manager for not raising an error

    def test_raises_error(self):
        detection_pattern = self.detection_pattern.clone()
        detection_pattern[0, 1] = 1
        with pytest.raises(AssertionError) as e:
            detect_head(model, test_duplicated_sequence, detection_pattern)
        assert "The detection pattern must be a lower triangular" in str(e.value)


#################################
# Detecting with specific heads #
#################################


class Test_specific_heads:
    class Test_regular_sentence_previous_token_head:
        @property  # port: computed per test (TL: at class creation), so one failure stays one test
        def match_mul(self):
            return detect_head(
                model,
                test_regular_sequence,
                "previous_token_head",
                heads=[(0, 0)],
                error_measure="mul",
            )
        @property  # port: computed per test (TL: at class creation), so one failure stays one test
        def match_abs(self):
            return detect_head(
                model,
                test_regular_sequence,
                "previous_token_head",
                heads=[(0, 0)],
                error_measure="abs",
            )

        def test_allclose_mul(self):
            assert torch.allclose(
                self.match_mul[0, 0],
                expected_regular_sequence_previous_match_mul[0, 0],
                atol=ATOL,
            )

        @_bidirectional
        def test_allclose_abs(self):
            assert torch.allclose(
                self.match_abs[0, 0],
                expected_regular_sequence_previous_match_abs[0, 0],
                atol=ATOL,
            )

        def test_isclose_mul(self):
            assert math.isclose(
                torch.sum(self.match_mul),
                self.match_mul[0, 0].item() - (model.cfg.n_layers * model.cfg.n_heads - 1),
                abs_tol=ATOL,
            )

        @_bidirectional
        def test_isclose_abs(self):
            assert math.isclose(
                torch.sum(self.match_abs),
                self.match_abs[0, 0].item() - (model.cfg.n_layers * model.cfg.n_heads - 1),
                abs_tol=ATOL,
            )

    class Test_duplicated_sentence_previous_token_head:
        @property  # port: computed per test (TL: at class creation), so one failure stays one test
        def match_mul(self):
            return detect_head(
                model,
                test_duplicated_sequence,
                "previous_token_head",
                heads=[(0, 0)],
                error_measure="mul",
            )
        @property  # port: computed per test (TL: at class creation), so one failure stays one test
        def match_abs(self):
            return detect_head(
                model,
                test_duplicated_sequence,
                "previous_token_head",
                heads=[(0, 0)],
                error_measure="abs",
            )

        def test_allclose_mul(self):
            assert torch.allclose(
                self.match_mul[0, 0],
                expected_duplicated_sequence_previous_match_mul[0, 0],
                atol=ATOL,
            )

        @_bidirectional
        def test_allclose_abs(self):
            assert torch.allclose(
                self.match_abs[0, 0],
                expected_duplicated_sequence_previous_match_abs[0, 0],
                atol=ATOL,
            )

        def test_isclose_mul(self):
            assert math.isclose(
                torch.sum(self.match_mul),
                self.match_mul[0, 0].item() - (model.cfg.n_layers * model.cfg.n_heads - 1),
                abs_tol=ATOL,
            )

        @_bidirectional
        def test_isclose_abs(self):
            assert math.isclose(
                torch.sum(self.match_abs),
                self.match_abs[0, 0].item() - (model.cfg.n_layers * model.cfg.n_heads - 1),
                abs_tol=ATOL,
            )

    class Test_duplicated_sentence_duplicate_token_head:
        @property  # port: computed per test (TL: at class creation), so one failure stays one test
        def match_mul(self):
            return detect_head(
                model,
                test_duplicated_sequence,
                "duplicate_token_head",
                heads=[(0, 0)],
                error_measure="mul",
            )
        @property  # port: computed per test (TL: at class creation), so one failure stays one test
        def match_abs(self):
            return detect_head(
                model,
                test_duplicated_sequence,
                "duplicate_token_head",
                heads=[(0, 0)],
                error_measure="abs",
            )

        def test_allclose_mul(self):
            assert torch.allclose(
                self.match_mul[0, 0],
                expected_duplicated_sequence_duplicate_match_mul[0, 0],
                atol=ATOL,
            )

        @_bidirectional
        def test_allclose_abs(self):
            assert torch.allclose(
                self.match_abs[0, 0],
                expected_duplicated_sequence_duplicate_match_abs[0, 0],
                atol=ATOL,
            )

        def test_isclose_mul(self):
            assert math.isclose(
                torch.sum(self.match_mul),
                self.match_mul[0, 0].item() - (model.cfg.n_layers * model.cfg.n_heads - 1),
                abs_tol=ATOL,
            )

        @_bidirectional
        def test_isclose_abs(self):
            assert math.isclose(
                torch.sum(self.match_abs),
                self.match_abs[0, 0].item() - (model.cfg.n_layers * model.cfg.n_heads - 1),
                abs_tol=ATOL,
            )

    class Test_duplicated_sentence_induction_head:
        @property  # port: computed per test (TL: at class creation), so one failure stays one test
        def match_mul(self):
            return detect_head(
                model,
                test_duplicated_sequence,
                "induction_head",
                heads=[(0, 0)],
                error_measure="mul",
            )
        @property  # port: computed per test (TL: at class creation), so one failure stays one test
        def match_abs(self):
            return detect_head(
                model,
                test_duplicated_sequence,
                "induction_head",
                heads=[(0, 0)],
                error_measure="abs",
            )

        def test_allclose_mul(self):
            assert torch.allclose(
                self.match_mul[0, 0],
                expected_duplicated_sequence_induction_match_mul[0, 0],
                atol=ATOL,
            )

        @_bidirectional
        def test_allclose_abs(self):
            assert torch.allclose(
                self.match_abs[0, 0],
                expected_duplicated_sequence_induction_match_abs[0, 0],
                atol=ATOL,
            )

        def test_isclose_mul(self):
            assert math.isclose(
                torch.sum(self.match_mul),
                self.match_mul[0, 0].item() - (model.cfg.n_layers * model.cfg.n_heads - 1),
                abs_tol=ATOL,
            )

        @_bidirectional
        def test_isclose_abs(self):
            assert math.isclose(
                torch.sum(self.match_abs),
                self.match_abs[0, 0].item() - (model.cfg.n_layers * model.cfg.n_heads - 1),
                abs_tol=ATOL,
            )


######################
# Detection patterns #
######################


@_no_bos
class Test_previous_token_head:
    regular_detection_pattern = get_previous_token_head_detection_pattern(
        model.to_tokens(test_regular_sequence).cpu()
    )

    def test_regular_detection_pattern1(self):
        assert self.regular_detection_pattern.shape == (4, 4)

    def test_regular_detection_pattern2(self):
        assert (self.regular_detection_pattern[1:, :-1] == torch.eye(3)).all()

    def test_regular_detection_pattern3(self):
        assert torch.sum(self.regular_detection_pattern) == 3

    duplicate_detection_pattern = get_previous_token_head_detection_pattern(
        model.to_tokens(test_duplicated_sequence).cpu()
    )

    def test_duplicate_detection_pattern1(self):
        assert self.duplicate_detection_pattern.shape == (7, 7)

    def test_duplicate_detection_pattern2(self):
        assert (self.duplicate_detection_pattern[1:, :-1] == torch.eye(6)).all()

    def test_duplicate_detection_pattern3(self):
        assert torch.sum(self.duplicate_detection_pattern) == 6


class Test_duplicate_token_head:
    detection_pattern = get_duplicate_token_head_detection_pattern(
        model.to_tokens(test_duplicated_sequence).cpu()
    )

    @_no_bos
    def test1(self):
        assert (
            get_duplicate_token_head_detection_pattern(model.to_tokens(test_regular_sequence).cpu())
            == torch.zeros(4, 4)
        ).all()

    @_no_bos
    def test2(self):
        assert self.detection_pattern.shape == (7, 7)

    @_no_bos
    def test3(self):
        assert (self.detection_pattern[4:, 1:4] == torch.eye(3)).all()

    def test4(self):
        assert torch.sum(self.detection_pattern) == 3


class Test_induction_head_detection:
    detection_pattern = get_induction_head_detection_pattern(
        model.to_tokens(test_duplicated_sequence).cpu()
    )

    @_no_bos
    def test1(self):
        assert (
            get_duplicate_token_head_detection_pattern(model.to_tokens(test_regular_sequence).cpu())
            == torch.zeros(4, 4)
        ).all()

    @_no_bos
    def test2(self):
        assert self.detection_pattern.shape == (7, 7)

    @_no_bos
    def test3(self):
        assert (self.detection_pattern[4:, 2:5] == torch.eye(3)).all()

    def test4(self):
        assert torch.sum(self.detection_pattern) == 3
