"""Fleet simulator: Debian 12 boards booted with systemd-nspawn in network namespaces."""
