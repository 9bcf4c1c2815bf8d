"""What touches Flask's request: auth, body validation, response bodies, the one error
handler, request and conversation ids; and one package per front (native, openai, ollama)."""
