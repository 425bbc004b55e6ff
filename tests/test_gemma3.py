"""The real Gemma-3-270M (asam_compile.gemma3): its own tokenizer, the cached loader, the attention recorder.

Skipped where the GGUF packages (or $ASAM_GEMMA3_GGUF) and `gguf` are absent. The first run dequantises the
file and caches it (about 40 s); later runs take about 30 s on a 2-core CPU.
"""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from asam_compile import gemma3  # noqa: E402
from asam_compile.models import long_text  # noqa: E402

pytestmark = pytest.mark.skipif(not gemma3.has_gemma3(), reason=f"Gemma-3 GGUF not installed: {gemma3.GEMMA3_SETUP}")


@pytest.fixture(scope="module")
def tokenizer():
    return gemma3.Gemma3Tokenizer.from_gguf()


@pytest.fixture(scope="module")
def model():
    return gemma3.load_gemma3(dtype=torch.float32, attn_implementation="eager")


def test_tokenizer_gives_the_long_text_back_and_puts_bos_first(tokenizer):
    text = long_text()
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id == 2
    assert tokenizer.bos_token_id not in ids[1:]
    assert tokenizer.decode(ids) == text
    # 16,917 ids with BOS (Note [Gemma-3 long text]); the same ids as Google's tokenizer.json for Gemma 3
    assert 16_384 < len(ids) < 18_000


def test_tokenizer_keeps_words_whole_as_the_files_scores_merge_them(tokenizer):
    ids = tokenizer.encode("Hello world")
    # not Hello/▁w/or/ld, as transformers' GGUF tokenizer has it
    assert tokenizer.tokens(ids) == ["<bos>", "Hello", "▁world"]
    # what the file's scores say: both words are pieces, and no piece spans the space
    vocab = tokenizer.vocab
    assert vocab.types[ids[1]] == vocab.types[ids[2]] == 1
    assert "Hello▁world" not in tokenizer._normal
    assert tokenizer.encode("Hello world", add_bos=False) == ids[1:]


def test_tokenizer_round_trips_spaces_newlines_tabs_and_bytes(tokenizer):
    texts = ["  two  spaces\n\n\tTab", "naïve café 日本語 🤖", "x<b>bold</b> [multimodal]", " leading", "a   b\n\n\n\nc", ""]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text, text
    # user-defined pieces are whole: a run of three spaces is one token, a blank line another
    assert tokenizer.tokens(tokenizer.encode("a   b\n\nc", add_bos=False)) == ["a", "   ", "b", "\n\n", "c"]


def test_perplexity_of_the_first_512_tokens_is_that_of_a_working_model(model, tokenizer):
    ids = gemma3.text_ids(tokenizer, 512)
    assert ids.shape == (1, 512) and ids[0, 0] == tokenizer.bos_token_id
    ppl = gemma3.perplexity(model, ids)
    assert ppl < 30, ppl  # 12.94 measured (CPU, float32); 179 with transformers' GGUF tokenizer


def test_global_layers_are_every_sixth(model):
    assert gemma3.global_layers(model) == gemma3.GLOBAL_LAYERS == (5, 11, 17)


def test_recording_attention_leaves_the_eager_logits_unchanged(model, tokenizer, monkeypatch):
    length = 600  # past the 512-token window: a window mask lost on the way (no mask function) shows
    monkeypatch.setattr(gemma3, "CHUNK_ROWS", 128)  # several chunks, some starting past the window
    ids = gemma3.text_ids(tokenizer, length)
    # the logits of the last 64 positions (which read every earlier one through attention): the LM head over all
    # 262,144 words at every position would take most of this test's time
    run = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=64).logits  # noqa: E731
    with torch.no_grad():
        expected = run()
        with gemma3.record_qkv(model, [0, 5, 11, 17], via="eager") as saved:
            got = run()
        with gemma3.record_qkv(model, [5], via="sdpa"):
            got_sdpa = run()
        with gemma3.record_qkv(model, [5], via="chunked") as saved_chunked:
            got_chunked = run()
    assert model.config._attn_implementation == "eager"  # restored
    assert torch.equal(got, expected)
    torch.testing.assert_close(got_sdpa, expected, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(got_chunked, expected, atol=2e-3, rtol=1e-3)
    # layer 5's inputs differ only by the rounding of layers 0-4's attention
    torch.testing.assert_close(saved_chunked[5]["q"], saved[5]["q"], atol=1e-2, rtol=1.6e-2)
    assert sorted(saved) == [0, 5, 11, 17]
    q, k, v = saved[5]["q"], saved[5]["k"], saved[5]["v"]
    assert q.shape == (1, 4, length, 256) and k.shape == v.shape == (1, 1, length, 256)
    assert q.dtype == torch.bfloat16
    assert saved[5]["scaling"] == 256**-0.5 and saved[5]["sliding_window"] is None
    assert saved[0]["sliding_window"] == 512


def test_gguf_named_by_environment(monkeypatch, tmp_path):
    path = tmp_path / "other.gguf"
    path.write_bytes(b"0123")
    monkeypatch.setenv(gemma3.GEMMA3_ENV, str(path))
    assert gemma3.gemma3_gguf_path() == path
    monkeypatch.setenv(gemma3.GEMMA3_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match=gemma3.GEMMA3_ENV):
        gemma3.gemma3_gguf_path()
