"""Files SAELens and sparsify wrote themselves (tests/fixtures/make_golden_saes.py) load through
``load_sae`` and encode as those libraries do, or are refused in one line naming the file and the
field; and what saescope writes has the keys, tensor names and dtypes SAELens writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sae_core.saes.formats import load_sae
from sae_core.saes.sae import SAE, SAEConfig, SAEError

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
VARIANTS = MANIFEST["variants"]
READ = [name for name, v in VARIANTS.items() if v["reads"]]
REFUSED = [name for name, v in VARIANTS.items() if not v["reads"]]


def _param(name: str):
    reason = VARIANTS[name]["xfail"]
    return pytest.param(name, marks=pytest.mark.xfail(reason=reason, strict=True)) if reason else name


def test_the_golden_files_record_the_libraries_that_wrote_them():
    assert set(MANIFEST["written_by"]) >= {"sae_lens", "eai-sparsify", "torch"}
    assert len(READ) >= 8 and len(REFUSED) >= 11


@pytest.mark.parametrize("name", [_param(name) for name in READ])
def test_library_written_sae_encodes_as_the_library_does(name):
    expected = load_file(GOLDEN / name / "expected.safetensors")
    sae = load_sae(GOLDEN / name)
    with torch.no_grad():
        out = sae(expected["x"])
    assert (expected["feature_acts"] > 0).any()  # the fixture exercises the activation
    torch.testing.assert_close(out.feature_acts, expected["feature_acts"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.sae_out, expected["sae_out"], rtol=0, atol=1e-5)
    assert sae.cfg.layer == 3


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_variant_is_refused_naming_file_and_field(name):
    field = VARIANTS[name]["field"]
    with pytest.raises(SAEError) as info:
        load_sae(GOLDEN / name)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(GOLDEN / name)) and "cfg.json" in message
    assert f"{field} = " in message


def _saescope_twin(tmp_path: Path, golden: str) -> Path:
    """Save with saescope an SAE of the golden one's architecture and metadata."""
    theirs = load_sae(GOLDEN / golden)
    cfg = SAEConfig(d_in=theirs.d_in, d_sae=theirs.d_sae, architecture=theirs.cfg.architecture, k=theirs.cfg.k,
                    model_name="smollm2-135m", hook_name=theirs.cfg.hook_name, layer=3)  # fmt: skip
    SAE.from_tensors(cfg, dict(theirs.named_parameters()), origin="test").save(tmp_path / golden)
    return tmp_path / golden


@pytest.mark.parametrize("golden", ["saelens-standard", "saelens-topk", "saelens-jumprelu"])
def test_saescope_folder_has_the_keys_names_and_dtypes_saelens_writes(tmp_path, golden):
    ours_folder = _saescope_twin(tmp_path, golden)
    ours = json.loads((ours_folder / "cfg.json").read_text())
    theirs = json.loads((GOLDEN / golden / "cfg.json").read_text())
    assert ours.pop("saescope")["model"] == "smollm2-135m"  # our own spec, in our own field
    assert set(ours) == set(theirs)
    assert set(ours["metadata"]) == set(theirs["metadata"])
    for key, value in theirs.items():
        assert type(ours[key]) is type(value), key
        if key not in ("d_in", "d_sae", "metadata"):  # the same settings, not just the same keys
            assert ours[key] == value, key
    assert ours["metadata"]["model_name"] == theirs["metadata"]["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    def layout(path):
        with safe_open(str(path), "pt") as f:
            return {name: (f.get_slice(name).get_dtype(), len(f.get_slice(name).get_shape())) for name in f.keys()}

    assert layout(ours_folder / "sae_weights.safetensors") == layout(GOLDEN / golden / "sae_weights.safetensors")
