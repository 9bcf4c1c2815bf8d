"""What a turn is, without Flask: agents, conversations, admission, the turn and its
events, watching, generation, shutdown and readiness. Everything it needs is handed in."""
