#!/usr/bin/env bash
# Build (once) a Debian chroot carrying a newer Postfix for the interop tests.
#   tests/chroots/build.sh SUITE [CACHE_DIR]
# The chroot is built in a temporary directory next to its final place and
# renamed into place when complete, under a lock, so concurrent test processes
# never build the same suite twice and never see a half-built tree.
# The chroot's postfix user and groups get the host's uid/gid so the chroot's
# programs can read and write a test instance bind-mounted at the same path.
set -euo pipefail
suite=${1:?suite}
cache=${2:-${PYPROXYMAP_CHROOT_CACHE:-/var/cache/pyproxymap/chroots}}
mirror=${PYPROXYMAP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
pkgs=postfix,postfix-cdb,postfix-lmdb,postfix-pcre
dest=$cache/$suite
mkdir -p "$cache"
exec 9>"$cache/.$suite.lock"
flock 9
if [ -e "$dest/.complete" ]; then exit 0; fi
tmp=$(mktemp -d "$cache/.$suite.build.XXXXXX")
chmod 755 "$tmp"
trap 'umount -R "$tmp/proc" 2>/dev/null || true; rm -rf --one-file-system "$tmp"' EXIT
# policy-rc.d inside the chroot: installing postfix must not start anything.
debootstrap --variant=minbase --include="$pkgs" \
  --exclude=systemd,systemd-sysv "$suite" "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
  tail -n 30 "$tmp.log" >&2; rm -f "$tmp.log"; exit 1; }
rm -f "$tmp.log"
# Same numeric ids as the host for postfix/postdrop (files owned by the old
# ids are re-owned); the host's must exist (postfix is installed there).
for who in postfix postdrop; do
  hgid=$(getent group "$who" | cut -d: -f3)
  cgid=$(chroot "$tmp" getent group "$who" | cut -d: -f3)
  if [ -n "$hgid" ] && [ "$hgid" != "$cgid" ]; then
    clash=$(chroot "$tmp" getent group "$hgid" | cut -d: -f1 || true)
    if [ -n "$clash" ]; then chroot "$tmp" groupmod -g 60000$RANDOM "$clash"; fi
    chroot "$tmp" groupmod -g "$hgid" "$who"
    find "$tmp" -xdev -gid "$cgid" -exec chgrp -h "$hgid" {} + 2>/dev/null || true
  fi
done
huid=$(id -u postfix)
cuid=$(chroot "$tmp" id -u postfix)
if [ "$huid" != "$cuid" ]; then
  clash=$(chroot "$tmp" getent passwd "$huid" | cut -d: -f1 || true)
  if [ -n "$clash" ]; then chroot "$tmp" usermod -u 6$RANDOM "$clash"; fi
  chroot "$tmp" usermod -u "$huid" -g "$(getent group postfix | cut -d: -f3)" postfix
  find "$tmp" -xdev -uid "$cuid" -exec chown -h "$huid" {} + 2>/dev/null || true
fi
chroot "$tmp" postconf -d mail_version | sed 's/.*= //' >"$tmp/.postfix-version"
# Nothing of apt's caches is needed at test time.
rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*_Packages
touch "$tmp/.complete"
trap - EXIT
rm -rf --one-file-system "$dest"
mv "$tmp" "$dest"
echo "$suite: postfix $(cat "$dest/.postfix-version") in $dest"
