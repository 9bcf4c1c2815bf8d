from pi_agent import create_app

app = create_app()
