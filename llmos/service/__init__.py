"""Running llmosd under systemd: readiness and watchdog notifications (notify.py) and the
unit file `llmos service install` writes (unit.py)."""
