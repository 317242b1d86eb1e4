"""The capability tables are the single source of truth: validation, `dlrun ls` and the README follow them."""

import pytest

from dlrun.config import capabilities
from helpers import REPO

README = (REPO / "README.md").read_text()


@pytest.mark.parametrize("mode,backend,note", capabilities.capability_rows())
def test_every_quantize_capability_is_in_the_readme(mode, backend, note):
    assert f"| `{mode}` | `{backend}` | {note} |" in README


@pytest.mark.parametrize("key", list(capabilities.EXPORT_CAPABILITIES))
def test_every_export_capability_is_in_the_readme(key):
    fmt, backend, kind = key
    assert f"| `{fmt}` | `{backend}` | `{kind}` | {capabilities.EXPORT_CAPABILITIES[key]} |" in README


def test_unsupported_quantize_pair_lists_the_supported_backends():
    with pytest.raises(ValueError, match="backend=torchao"):
        capabilities.check_supported("weight_only", "xnnpack")
    capabilities.check_supported("qat", "xnnpack")  # the command users type literally


def test_refused_export_names_the_reason_and_the_alternatives():
    with pytest.raises(ValueError) as error:
        capabilities.check_export_supported("pte", "xnnpack", "weight_only")
    message = str(error.value)
    assert "\n" not in message and "silently wrong" in message and "backend=portable" in message


def test_ls_shows_the_tables_without_importing_torch(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dlrun", "ls", "quantizer"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "x86_inductor" in out.stdout and "torchao" in out.stdout
    assert not any(line.rsplit("|", 1)[-1].strip() == "torch" for line in out.stderr.splitlines())
