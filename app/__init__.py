"""sgf-dmft dashboard (Panel). Arranges, schedules and draws; never computes physics."""
