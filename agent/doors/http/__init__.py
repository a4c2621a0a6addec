"""The HTTP door: twisted.web resources that translate JSON and HTTP into engine calls.

router.py maps paths to handlers and every error to its status in one
place; auth.py checks the bearer token; body.py validates request bodies;
tasks.py and output.py are the endpoints; openapi.py describes them.
"""
