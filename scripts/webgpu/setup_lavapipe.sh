#!/usr/bin/env bash
# WebGPU with shader-f16 on a CPU-only machine: Mesa's lavapipe 25 (Vulkan on the CPU) from Debian
# bookworm-backports, extracted into build/lavapipe/ (git-ignored) — nothing is installed system-wide.
#
#   build/lavapipe/root/          the .deb files' contents (dpkg -x): libvulkan_lvp.so, newer libdrm, the
#                                 Vulkan loader (libvulkan1) and headers (libvulkan-dev)
#   build/lavapipe/lvp_icd.json   Vulkan ICD manifest, absolute library_path (onnxruntime-node's WebGPU uses it)
#   build/lavapipe/dawn_lvp_shim.so + shim_icd.json
#                                 scripts/webgpu/dawn_lvp_shim.c: lavapipe with SwiftShader's ids for Dawn only,
#                                 the only CPU adapter Chromium hands to WebGPU
#   build/lavapipe/chromium/      hard-linked copy of /usr/lib/chromium without libvk_swiftshader.so (else Dawn
#                                 picks its bundled SwiftShader first)
#   build/lavapipe/vk_probe       prints the Vulkan devices a process sees (the tests assert shader-f16, subgroup 8)
#   build/lavapipe/shader-cache/  MESA_SHADER_CACHE_DIR, kept between runs (a cold first prompt compiles ~30-50 s)
#   build/lavapipe/route.json     written last: {"status": "ready", ...} or {"status": "unavailable", "reason": ...};
#                                 tests/js/webgpu_route.mjs reads it
#
# Idempotent: a ready route whose inputs (this script, the C sources, Chromium's version) are unchanged is kept
# after one probe (well under a second). When bookworm-backports cannot be reached the route is recorded as
# unavailable with the reason and how to get it; setup continues, and the lavapipe tests fail with that message.
# GRAPHKIT_DEBIAN_MIRROR overrides http://deb.debian.org/debian.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOTDIR=$PWD
OUT=$ROOTDIR/build/lavapipe
MIRROR=${GRAPHKIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
LIB=$OUT/root/usr/lib/x86_64-linux-gnu
CHROMIUM_SRC=${GRAPHKIT_CHROMIUM_DIR:-/usr/lib/chromium}
mkdir -p "$OUT"

say() { echo "[setup] lavapipe: $*"; }

unavailable() {  # $1: the reason, with how to get it; recorded for the tests, setup itself goes on
  say "UNAVAILABLE — $1"
  python3 - "$OUT/route.json" "$1" <<'EOF'
import json, os, sys
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as fh:
    json.dump({"status": "unavailable", "reason": sys.argv[2]}, fh, indent=1)
os.replace(tmp, sys.argv[1])
EOF
  exit 0
}

chromium_version=$( [ -x "$CHROMIUM_SRC/chromium" ] && "$CHROMIUM_SRC/chromium" --version 2>/dev/null || echo none)
inputs_hash=$( (cat scripts/webgpu/setup_lavapipe.sh scripts/webgpu/dawn_lvp_shim.c scripts/webgpu/vk_probe.c;
                echo "$chromium_version $MIRROR $OUT") | sha256sum | cut -c1-16)

if [ -f "$OUT/route.json" ] && grep -q '"status": "ready"' "$OUT/route.json" \
   && grep -q "\"inputs\": \"$inputs_hash\"" "$OUT/route.json" \
   && VK_ICD_FILENAMES=$OUT/lvp_icd.json LD_LIBRARY_PATH=$LIB "$OUT/vk_probe" 2>/dev/null | grep -q '"shader_float16": true'; then
  say "ready ($OUT)"
  exit 0
fi

[ "$(dpkg --print-architecture 2>/dev/null)" = amd64 ] || unavailable "this set-up handles Debian amd64 only (dpkg says '$(dpkg --print-architecture 2>/dev/null)')"
command -v apt-get >/dev/null && command -v dpkg >/dev/null || unavailable "apt-get/dpkg not found: the route extracts Debian packages (Debian 12 bookworm)"
if ! command -v gcc >/dev/null; then  # like Chromium itself (setup.sh), the compiler comes from Debian's apt
  say "installing gcc (the ICD shim and the probe are compiled at set-up time)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gcc libc6-dev >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gcc libc6-dev >/dev/null 2>&1; }
fi
command -v gcc >/dev/null || unavailable "gcc not found and apt-get could not install it: the Chromium ICD shim and the probe are compiled at set-up time (apt-get install gcc libc6-dev)"

# A private apt configuration: its own sources list, package lists and cache under build/lavapipe/apt, so the
# system's sources and installed packages stay untouched.
APT=$OUT/apt
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/sources.list.d" "$APT/preferences.d" "$OUT/debs"
cat > "$APT/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-backports main
EOF
APTOPTS=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=$APT/sources.list.d"
         -o "Dir::Etc::Preferences=$APT/preferences" -o "Dir::Etc::PreferencesParts=$APT/preferences.d"
         -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "Debug::NoLocking=1"
         -o "APT::Sandbox::User=$(id -un)" -o "Acquire::Retries=2" -q)
say "fetching package lists for bookworm + bookworm-backports from $MIRROR (private apt state in $APT)"
if ! log=$(apt-get "${APTOPTS[@]}" update 2>&1) || echo "$log" | grep -qE '^(E|W): Failed to fetch'; then
  unavailable "cannot fetch bookworm-backports package lists from $MIRROR ($(echo "$log" | grep -E '^(E|W):' | head -2 | tr '\n' ' ')). WebGPU f16 needs Mesa's lavapipe 25 (mesa-vulkan-drivers 25.x from bookworm-backports; Debian 12's own 22.3 lacks what Dawn requires): make $MIRROR reachable, or set GRAPHKIT_DEBIAN_MIRROR to a Debian mirror, and rerun bash scripts/setup.sh"
fi
mesa_version=$(apt-cache "${APTOPTS[@]}" madison mesa-vulkan-drivers 2>/dev/null | awk -F'|' '/bookworm-backports/ {gsub(/ /,"",$2); print $2; exit}')
case "$mesa_version" in
  2[5-9].*|[3-9][0-9].*) ;;
  *) unavailable "bookworm-backports at $MIRROR offers no mesa-vulkan-drivers >= 25 (found '${mesa_version:-none}'); lavapipe 25.x is needed (Dawn rejects Debian 12's 22.3: shaderUniform*ArrayDynamicIndexing)" ;;
esac

# The packages: lavapipe + the libdrm it needs from backports, the Vulkan loader and headers; plus any of
# lavapipe's other dependencies this system lacks (a minimal image may not have them).
pkgs=(mesa-vulkan-drivers/bookworm-backports libdrm2/bookworm-backports libdrm-amdgpu1/bookworm-backports libvulkan1 libvulkan-dev)
for dep in $(apt-cache "${APTOPTS[@]}" depends "mesa-vulkan-drivers=$mesa_version" 2>/dev/null | awk '/^  Depends:/ {print $2}' | tr -d '<>' | sort -u); do
  case "$dep" in libdrm2|libdrm-amdgpu1|libvulkan1|libc6|libgcc-s1|libstdc++6) continue ;; esac
  dpkg-query -W -f='${Status}' "$dep" 2>/dev/null | grep -q 'install ok installed' || pkgs+=("$dep")
done
say "downloading ${pkgs[*]}"
rm -f "$OUT/debs"/*.deb
if ! log=$(cd "$OUT/debs" && apt-get "${APTOPTS[@]}" download "${pkgs[@]}" 2>&1); then
  unavailable "apt-get download failed: $(echo "$log" | grep -E '^(E|W):' | head -3 | tr '\n' ' ') (packages: ${pkgs[*]} from $MIRROR)"
fi
rm -rf "$OUT/root.tmp" && mkdir -p "$OUT/root.tmp"
for deb in "$OUT/debs"/*.deb; do dpkg -x "$deb" "$OUT/root.tmp" || unavailable "dpkg -x $deb failed"; done
rm -rf "$OUT/root" && mv "$OUT/root.tmp" "$OUT/root"
[ -f "$LIB/libvulkan_lvp.so" ] || unavailable "the extracted mesa-vulkan-drivers has no libvulkan_lvp.so ($LIB)"
missing=$(LD_LIBRARY_PATH=$LIB ldd "$LIB/libvulkan_lvp.so" | awk '/not found/ {print $1}' | tr '\n' ' ')
[ -z "$missing" ] || unavailable "libvulkan_lvp.so needs libraries this system lacks: $missing(apt-get install the packages that provide them)"

api=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['ICD']['api_version'])" "$OUT/root/usr/share/vulkan/icd.d/lvp_icd.json")
printf '{"file_format_version": "1.0.0", "ICD": {"library_path": "%s", "api_version": "%s"}}\n' "$LIB/libvulkan_lvp.so" "$api" > "$OUT/lvp_icd.json"

say "building the Dawn ICD shim and the Vulkan probe (gcc)"
gcc -O2 -shared -fPIC -fvisibility=hidden -Wall -Wextra -I "$OUT/root/usr/include" \
    -DLVP_LIBRARY="\"$LIB/libvulkan_lvp.so\"" -o "$OUT/dawn_lvp_shim.so" scripts/webgpu/dawn_lvp_shim.c -ldl -lpthread \
  || unavailable "compiling scripts/webgpu/dawn_lvp_shim.c failed (gcc output above)"
printf '{"file_format_version": "1.0.0", "ICD": {"library_path": "%s", "api_version": "%s"}}\n' "$OUT/dawn_lvp_shim.so" "$api" > "$OUT/shim_icd.json"
gcc -O2 -Wall -I "$OUT/root/usr/include" -o "$OUT/vk_probe" scripts/webgpu/vk_probe.c -L "$LIB" -lvulkan \
  || unavailable "compiling scripts/webgpu/vk_probe.c failed (gcc output above)"

probe=$(VK_ICD_FILENAMES=$OUT/lvp_icd.json LD_LIBRARY_PATH=$LIB "$OUT/vk_probe" 2>&1)
echo "$probe" | grep -q '"shader_float16": true' && echo "$probe" | grep -q '"subgroup_size": 8' \
  || unavailable "lavapipe loaded but does not offer shaderFloat16 with subgroup size 8: $probe"

# Chromium: a copy of its folder (hard links: no extra disk) without the bundled SwiftShader ICD.
if [ -x "$CHROMIUM_SRC/chromium" ]; then
  rm -rf "$OUT/chromium.tmp"
  cp -al "$CHROMIUM_SRC" "$OUT/chromium.tmp" 2>/dev/null || cp -a "$CHROMIUM_SRC" "$OUT/chromium.tmp" \
    || unavailable "cannot copy $CHROMIUM_SRC to $OUT/chromium"
  rm -f "$OUT/chromium.tmp/libvk_swiftshader.so" "$OUT/chromium.tmp/vk_swiftshader_icd.json"
  rm -rf "$OUT/chromium" && mv "$OUT/chromium.tmp" "$OUT/chromium"
  chromium_exe=$OUT/chromium/chromium
else
  chromium_exe=""
  say "no Chromium at $CHROMIUM_SRC: the Node route is ready, the Chromium route is not"
fi
mkdir -p "$OUT/shader-cache"

python3 - "$OUT" "$inputs_hash" "$mesa_version" "$chromium_exe" "$probe" <<'EOF'
import json, os, sys
out, inputs, mesa, chromium, probe = sys.argv[1:6]
lib = os.path.join(out, "root/usr/lib/x86_64-linux-gnu")
route = {"status": "ready", "inputs": inputs, "mesa": mesa, "lib_dir": lib,
         "node_icd": os.path.join(out, "lvp_icd.json"), "chromium_icd": os.path.join(out, "shim_icd.json"),
         "chromium": chromium or None, "probe": os.path.join(out, "vk_probe"),
         "shader_cache": os.path.join(out, "shader-cache"), "device": json.loads(probe)["devices"][0]}
tmp = os.path.join(out, "route.json.tmp")
with open(tmp, "w") as fh:
    json.dump(route, fh, indent=1)
os.replace(tmp, os.path.join(out, "route.json"))
EOF
say "ready: Mesa $mesa_version, $(echo "$probe" | python3 -c 'import json,sys; d=json.load(sys.stdin)["devices"][0]; print(d["name"], "shader_float16", d["shader_float16"], "subgroup", d["subgroup_size"])')"
