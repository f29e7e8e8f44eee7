#!/bin/sh
# Installs Debian's cloud-init for the user-data schema test, without starting or
# enabling anything on this machine (policy-rc.d refuses every service start).
set -eu
export DEBIAN_FRONTEND=noninteractive
created=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 0755 /usr/sbin/policy-rc.d
  created=1
fi
trap '[ -n "$created" ] && rm -f /usr/sbin/policy-rc.d' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends cloud-init >/dev/null
