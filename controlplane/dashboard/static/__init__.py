"""Static assets of the dashboard (a package only so they ship in the wheel)."""
