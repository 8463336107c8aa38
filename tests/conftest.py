"""Shared test set-up. TRITON_INTERPRET must be set before any Triton kernel module is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MOA_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MOA_CROSSOVER", "off")  # no machine-dependent measuring in tests; test_crossover sets it

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def make_tiny_model(arch: str = "llama", *, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                    vocab: int = 128, seed: int = 0, dtype=torch.float32):
    """A seeded, randomly initialised decoder of the given family, small enough for unit tests."""
    import transformers

    config_cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[arch]
    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
    }[arch]
    kwargs = dict(
        vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )
    if arch in ("qwen3",):
        kwargs["head_dim"] = head_dim
    if arch == "mistral":
        kwargs["sliding_window"] = None
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).to(dtype).eval()
    return model


@pytest.fixture(params=TINY_ARCHS)
def tiny_arch_model(request):
    return make_tiny_model(request.param)


# ---- Services: PostgreSQL and an MLflow tracking server on the loopback (tests marked `distributed`) ----------

import contextlib  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POSTGRES_SCRIPT = REPO / "scripts" / "postgres.sh"
SERVER_START_S = 90  # an MLflow server on PostgreSQL takes about 15 s to answer on 2 cores


def _unreachable(url: str) -> str | None:
    """Why PostgreSQL at ``url`` does not accept a connection (None: it does). Not pipeline.services: that is
    under test."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect():
            return None
    except sqlalchemy.exc.SQLAlchemyError as err:
        return str(err).splitlines()[0].replace(str(engine.url.password), "***")
    finally:
        engine.dispose()


def _start_local_postgres() -> tuple[str | None, str]:
    """``scripts/postgres.sh start``: the URL of its ``moa_test`` database, or None and why not."""
    try:
        subprocess.run(["bash", str(POSTGRES_SCRIPT), "start"], check=True, capture_output=True, text=True,
                       timeout=600)
        base = subprocess.run(["bash", str(POSTGRES_SCRIPT), "url"], check=True, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except subprocess.CalledProcessError as err:
        return None, f"scripts/postgres.sh {err.cmd[-1]} failed: {(err.stderr or '').strip()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"scripts/postgres.sh: {err}"
    url = f"{base}/moa_test"
    return (None, problem) if (problem := _unreachable(url)) else (url, "")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A PostgreSQL URL (``postgresql+psycopg://moa:...@127.0.0.1:5432/moa_test``) whose role may create databases.

    ``MOA_TEST_POSTGRES`` when set and reachable (CI sets it); else ``scripts/postgres.sh start``. Without either
    the test is skipped, or failed under ``MOA_REQUIRE_SERVICES=1`` (CI), where a silent skip would hide it."""
    url = os.environ.get("MOA_TEST_POSTGRES")
    if url and not _unreachable(url):
        return url
    url, problem = _start_local_postgres()
    if url:
        return url
    message = f"no PostgreSQL for the distributed tests: {problem}"
    if os.environ.get("MOA_REQUIRE_SERVICES") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
def postgres_db(postgres_url) -> Iterator[str]:
    """A fresh, empty database of this test's own (its URL), dropped afterwards."""
    import sqlalchemy

    name = f"moa_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        yield sqlalchemy.engine.make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:  # FORCE: a server still holding connections must not keep it alive
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(postgres_db, tmp_path) -> Iterator[str]:
    """A real ``mlflow server`` on a free loopback port: its URI. The store is ``postgres_db``; artifacts go
    through the server (``mlflow-artifacts:/``) into ``tmp_path/mlartifacts-server``; its log is
    ``tmp_path/mlflow-server.log``. Its process group is killed afterwards."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow-server.log"
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": postgres_db,  # the password stays off the command line
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job workers: 7 fewer processes to start
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--serve-artifacts", "--artifacts-destination", str(tmp_path / "mlartifacts-server")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for_health(uri, server, log)
        yield uri
    finally:
        _stop_group(server)


def _wait_for_health(uri: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{log.read_text()[-2000:]}", pytrace=False)
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer {uri}/health in {SERVER_START_S} s:\n{log.read_text()[-2000:]}",
                pytrace=False)


def _stop_group(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left of it after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=10)
