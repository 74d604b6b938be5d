#!/bin/sh
# OpenSSH and rsync for a machine that has none (the device machines): build the folder here, carry it
# there, and set it up there before `python3 benchmarks/push.py --nodes sshd`.
#
#   benchmarks/carry_ssh_tools.sh build DIR   here: DIR/real (this machine's ssh, scp, rsync, sshd,
#                                             ssh-keygen), DIR/lib (their libraries), DIR/bin (wrappers)
#   . benchmarks/carry_ssh_tools.sh setup DIR there, sourced: puts each missing tool on PATH and
#                                             points TRTLLM_DEPLOY_TEST_SSHD at the carried sshd
#
# DIR must be ignored by git (.git/info/exclude) and named in the run's carry. The wrappers give
# each binary its own libraries; sshd sessions get a clean environment, so what they run is not
# affected. The machine's own tools are used wherever they exist.
verb=$1 dir=$2
[ -n "$dir" ] || { echo "usage: $0 build|setup DIR" >&2; exit 2; }
case $verb in
build)
    set -e
    mkdir -p "$dir/real" "$dir/lib" "$dir/bin"
    for tool in ssh scp rsync sshd ssh-keygen; do
        path=$(command -v $tool || ls /usr/sbin/$tool)
        cp "$path" "$dir/real/$tool"
        ldd "$path" | awk '$3 ~ /^\// {print $3}' | grep -v -E '/(libc|libresolv|libm|libdl|libpthread)\.so' |
            while read -r lib; do cp -L "$lib" "$dir/lib/"; done
        printf '#!/bin/sh\n# carried by benchmarks/carry_ssh_tools.sh, with its own libraries\n%s\n%s\n' \
            'd=$(dirname "$(readlink -f "$0")")/..' \
            "LD_LIBRARY_PATH=\"\$d/lib\" exec \"\$d/real/$tool\" \"\$@\"" >"$dir/bin/$tool"
        chmod +x "$dir/bin/$tool"
    done
    du -sh "$dir"
    ;;
setup)
    bin=$(cd "$dir/bin" && pwd)
    for tool in ssh scp rsync ssh-keygen; do
        command -v $tool >/dev/null || { ln -sf "$bin/$tool" /usr/local/bin/$tool; echo "carried $tool"; }
    done
    [ -e /usr/bin/ssh ] || ln -s "$bin/ssh" /usr/bin/ssh  # scp runs /usr/bin/ssh by that path
    [ -x /usr/sbin/sshd ] || { export TRTLLM_DEPLOY_TEST_SSHD="$bin/sshd"; echo "carried sshd"; }
    id sshd >/dev/null 2>&1 || useradd -r -M -d /run/sshd -s /usr/sbin/nologin sshd  # privilege separation
    # sshd sessions look for python3 on the default PATH (/usr/local/bin:/usr/bin:/bin)
    [ -e /usr/bin/python3 ] || [ -e /usr/local/bin/python3 ] || ln -s "$(command -v python3)" /usr/local/bin/python3
    ;;
*)
    echo "usage: $0 build|setup DIR" >&2; exit 2
    ;;
esac
