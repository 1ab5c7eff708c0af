# Two entry points for a fresh Debian machine (as root):
#   make run   - install what is missing, start the master on the sample configuration
#   make test  - install what is missing, run the test suite
# Plus: make stop, make status, make bench, make install / make uninstall.

PY      := .venv/bin/python
TOP     := $(CURDIR)
RUN     := $(TOP)/run
APT_PKGS := postfix postfix-lmdb postfix-pcre postfix-cdb libdb-dev db5.3-util
# Postfix 3.10/3.11 clients for the tests come from Debian chroots (tests/chroots/build.sh)
APT_PKGS += debootstrap
# tables beyond one host: Postfix's own clients to compare with, servers the tests start
APT_PKGS += postfix-sqlite postfix-pgsql postfix-mysql postgresql mariadb-server
# make bench counts instructions per lookup (ours, the C proxymap) with callgrind
APT_PKGS += valgrind
# memcache: and redis: tables: the servers the tests start (tests/servers.py)
APT_PKGS += memcached redis-server
# ldap: Postfix's own client to compare with, the directory server the tests start
APT_PKGS += postfix-ldap slapd ldap-utils

.PHONY: run stop status test bench deps clean install uninstall

deps: .venv/.installed

# Debian packages first (berkeleydb compiles against libdb-dev; tests drive
# real Postfix), installed without questions and without starting Postfix.
.apt-done:
	@if ! command -v postmap >/dev/null || ! dpkg -s $(filter-out postfix,$(APT_PKGS)) >/dev/null 2>&1; then \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PKGS); \
	fi
	@touch $@

# pip builds the optional compiled hot path (proxymap/_hotpath.c) in place
.venv/.installed: .apt-done setup.cfg setup.py pyproject.toml proxymap/_hotpath.c
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

run: deps
	mkdir -p $(RUN)/etc $(RUN)/queue $(RUN)/data
	sed 's|@RUN@|$(RUN)|g' etc/postfix/main.cf > $(RUN)/etc/main.cf
	cp etc/postfix/master.cf etc/postfix/virtual $(RUN)/etc/
	chmod 755 $(RUN) $(RUN)/etc
	/usr/sbin/postmap -c $(RUN)/etc hash:$(RUN)/etc/virtual
	@.venv/bin/proxymap-master -c $(RUN)/etc stop >/dev/null 2>&1 || true
	.venv/bin/proxymap-master -c $(RUN)/etc start
	/usr/sbin/postmap -c $(RUN)/etc -q postmaster@example.com proxy:hash:$(RUN)/etc/virtual
	@echo "running; try: postmap -c $(RUN)/etc -q info@example.com proxy:hash:$(RUN)/etc/virtual"
	@echo "stop with: make stop"

stop:
	.venv/bin/proxymap-master -c $(RUN)/etc stop

status:
	.venv/bin/proxymap-master -c $(RUN)/etc status

# The whole suite twice: on the compiled hot path (where pip could build it),
# then on the pure-Python one that serves where it could not.
test: deps
	$(PY) -m pytest -q tests
	PROXYMAP_PURE_PYTHON=1 $(PY) -m pytest -q tests

bench: deps
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) benchmarks/run.py
	$(PY) benchmarks/remote.py
	mkdir -p benchmarks/results && $(PY) benchmarks/instructions.py --json benchmarks/results/instructions.json

# make install: a site install (as root), not editable: a virtualenv of its
# own under PREFIX with the package built from this checkout, the programs
# linked into BINDIR, the docs and sample configuration in DOCDIR, the
# systemd unit and the logrotate snippet with these paths, and `pyproxymap`
# in Postfix's daemon directory for running under Postfix's own master
# (POSTFIX_DAEMON_DIR= skips that link). docs/operations.md, "Install".
PREFIX             ?= /opt/pyproxymap
BINDIR             ?= /usr/local/bin
DOCDIR             ?= /usr/local/share/doc/pyproxymap
UNITDIR            ?= /etc/systemd/system
LOGROTATEDIR       ?= /etc/logrotate.d
POSTFIX_DAEMON_DIR ?= /usr/lib/postfix/sbin
PROGRAMS           := proxymap-master proxymap proxymap-postmap
SITE_PATHS = sed -e 's|/usr/local/bin|$(BINDIR)|g' -e 's|/usr/local/share/doc/pyproxymap|$(DOCDIR)|g'

install: .apt-done
	test -x $(PREFIX)/bin/python || python3 -m venv $(PREFIX)
	$(PREFIX)/bin/python -m pip install -q --upgrade pip
	$(PREFIX)/bin/python -m pip install -q .
	mkdir -p $(BINDIR) $(DOCDIR)/examples $(UNITDIR) $(LOGROTATEDIR)
	for p in $(PROGRAMS); do ln -sfn $(PREFIX)/bin/$$p $(BINDIR)/$$p; done
	cp README.md docs/*.md docs/*.png $(DOCDIR)/
	sed -e 's|@RUN@/queue|/var/spool/postfix|' -e 's|@RUN@/data|/var/lib/postfix|' \
	  etc/postfix/main.cf > $(DOCDIR)/examples/main.cf
	cp etc/postfix/master.cf etc/postfix/virtual $(DOCDIR)/examples/
	$(SITE_PATHS) etc/systemd/proxymap.service > $(UNITDIR)/proxymap.service
	$(SITE_PATHS) etc/logrotate.d/pyproxymap > $(LOGROTATEDIR)/pyproxymap
	chmod 644 $(UNITDIR)/proxymap.service $(LOGROTATEDIR)/pyproxymap
	if [ -n "$(POSTFIX_DAEMON_DIR)" ] && [ -d "$(POSTFIX_DAEMON_DIR)" ]; then \
	  ln -sfn $(BINDIR)/proxymap $(POSTFIX_DAEMON_DIR)/pyproxymap; fi
	@echo "installed $$($(BINDIR)/proxymap-master --version) in $(PREFIX); programs in $(BINDIR);"
	@echo "docs in $(DOCDIR); unit $(UNITDIR)/proxymap.service (systemctl daemon-reload)"

uninstall:
	for p in $(PROGRAMS); do rm -f $(BINDIR)/$$p; done
	rm -f $(UNITDIR)/proxymap.service $(LOGROTATEDIR)/pyproxymap
	if [ -n "$(POSTFIX_DAEMON_DIR)" ]; then rm -f $(POSTFIX_DAEMON_DIR)/pyproxymap; fi
	rm -rf $(PREFIX) $(DOCDIR)

clean:
	rm -rf .venv .apt-done run
