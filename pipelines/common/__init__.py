"""Code shared by the stages and the service; each concern has exactly one home here."""
