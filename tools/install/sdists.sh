# The pinned detectron2 and lvis sdists and the step that turns one into patched source. Sourced
# by install.sh (which installs the source) and tools/gpu_check/build_wheelhouse.sh (which builds
# wheels of it), so that both ship the same verified, patched code.
# The caller defines PY (a python with pip), CACHE (download folder), HERE (tools/install) and the
# functions say and die.

D2_URL="https://files.pythonhosted.org/packages/60/26/48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/pb1-detectron2-0.6.tar.gz"
D2_SHA256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
LVIS_URL="https://files.pythonhosted.org/packages/ea/fe/c18531099e7538bd6a53de8b2f8e900a5cf6a82d0c603325031a4122da5a/lvis-0.5.3.tar.gz"
LVIS_SHA256="55aeeb84174abea2ed0d6985a8e93aa9bdbb60c61c6db130c8269a275ef61a6e"

fetch() {  # fetch URL SHA256 -> prints the verified local file
    local url="$1" sha="$2" out="$CACHE/$(basename "$1")"
    mkdir -p "$CACHE"
    if [ ! -f "$out" ] || [ "$(sha256sum "$out" | cut -d' ' -f1)" != "$sha" ]; then
        say "downloading $(basename "$url")"
        "$PY" - "$url" "$out.part" <<'EOF' || die "could not download $url (registry unreachable?)"
import sys, urllib.request
urllib.request.urlretrieve(sys.argv[1], sys.argv[2])
EOF
        local got; got="$(sha256sum "$out.part" | cut -d' ' -f1)"
        if [ "$got" != "$sha" ]; then
            rm -f "$out.part"
            die "sha256 mismatch for $(basename "$url"): expected $sha, got $got. Refusing to install it."
        fi
        mv "$out.part" "$out"
    fi
    echo "$out"
}

patched_source() {  # patched_source NAME URL SHA256 DIR -> unpacks into DIR, patches, prints the source folder
    local tgz src
    tgz="$(fetch "$2" "$3")"
    tar -xzf "$tgz" -C "$4"
    src="$(echo "$4"/*)"
    "$PY" "$HERE/patch_third_party.py" "$1" "$src" >&2
    echo "$src"
}
