from pi_agent import create_app

app = create_app()
# The name mod_wsgi looks for unless told otherwise (WSGICallableObject).
application = app
