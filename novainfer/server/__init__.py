"""OpenAI-compatible HTTP server (`novainfer serve`).

Server dependencies (fastapi, uvicorn, pydantic) are imported only by the modules of this
package that need them, never by `import novainfer`. Install them with
`pip install novainfer[server]`.
"""
