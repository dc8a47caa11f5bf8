"""docs/install.md, "The local control plane (no Docker)", run word for word: its shell
blocks, in order, in one bash in the repository root (what a newcomer pastes). The operator
it starts runs with the chart's ServiceAccount token, so a missing RBAC rule or a wrong step
in the text fails here."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from devcluster import Cluster

from tests.cluster.test_helm_chart import helm
from tests.fixtures.cluster import REPO

pytestmark = pytest.mark.cluster
DOC = REPO / "docs" / "install.md"
SECTION = "## The local control plane (no Docker)"


def doc_blocks() -> list[str]:
    text = DOC.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    blocks = re.findall(r"```sh\n(.*?)```", text[start:end if end > 0 else None], re.DOTALL)
    assert len(blocks) >= 3, "the section's shell blocks were not found"
    return blocks


def _cleanup(cluster: Cluster) -> None:
    """What the doc's last block does, for a run that stopped before it."""
    pid_file = REPO / ".dev" / "kubeforge-operator.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().strip()), 15)
        except (ProcessLookupError, ValueError):
            pass
        pid_file.unlink()
    cluster.kubectl("delete", "kubeforge", "--all", "-n", "kubeforge-apps", "--timeout=60s", check=False)
    helm(cluster, "uninstall", "kubeforge", "-n", "kubeforge-system", "--wait", check=False)
    cluster.kubectl("delete", "namespace", "kubeforge-apps", "kubeforge-system", "--ignore-not-found", check=False)


def test_install_md_local_section_word_for_word(cluster: Cluster) -> None:
    blocks = doc_blocks()
    script = "set -euo pipefail\nunset KUBECONFIG\n" + "\n".join(blocks)
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    try:
        out = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        log_file = REPO / ".dev" / "kubeforge-operator.log"
        log = log_file.read_text() if log_file.exists() else "(no operator log)"
        assert out.returncode == 0, (f"docs/install.md failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}\n"
                                     f"operator log (it listens on the doc's fixed ports 18080/18081):\n{log[-3000:]}")
        assert "system:serviceaccount:kubeforge-system:kubeforge" in out.stdout, out.stdout[-3000:]
        assert re.search(r"trainingjob\.kubeforge\.dev/tiny-llama\s+Running", out.stdout), out.stdout[-3000:]
        assert "forbidden" not in log.lower(), log[-3000:]
        # the last block removed everything it made
        assert not (REPO / ".dev" / "kubeforge-operator.pid").exists()
        left = cluster.kubectl("get", "namespace", "kubeforge-apps", "kubeforge-system", check=False)
        assert left.returncode != 0, left.stdout
    finally:
        _cleanup(cluster)
