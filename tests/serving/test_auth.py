"""Optional bearer-token auth on both ingresses.

End to end: an application whose Ingress replica has ``VIA_SD_API_TOKEN`` in its environment
(``ray_actor_options.runtime_env.env_vars``; in Kubernetes a Secret sets it) refuses HTTP without
``Authorization: Bearer <token>`` (401, ``WWW-Authenticate: Bearer``) and gRPC without the
``authorization`` metadata (UNAUTHENTICATED); ``/health`` stays open; the ``openai`` client works
with ``api_key=<token>``. Without a server: where the token comes from, and what is refused.
"""

from __future__ import annotations

import secrets

import grpc
import httpx
import openai
import pytest

from tests.serving.apps import deployed, tiny_args
from via_sd_ray.errors import ConfigError
from via_sd_ray.serving.auth import TOKEN_ENV, TOKEN_FILE_ENV, BearerAuth, InvalidToken, MissingToken, load_token
from via_sd_ray.serving.grpc_gen import via_sd_pb2 as pb

MODEL = "via-sd-tiny"
TOKEN = secrets.token_urlsafe(24)
BODY = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def app(cluster):
    env = {"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": {TOKEN_ENV: TOKEN}}}}
    with deployed(cluster, "auth", tiny_args(Ingress=env)) as app:
        yield app


@pytest.mark.parametrize(("authorization", "challenge"), [
    (None, 'Bearer realm="via-sd"'),
    ("Bearer", 'Bearer realm="via-sd"'),
    (f"Basic {TOKEN}", 'Bearer realm="via-sd"'),
    ("Bearer wrong-token", 'Bearer realm="via-sd", error="invalid_token"'),
    (f"Bearer {TOKEN}x", 'Bearer realm="via-sd", error="invalid_token"'),
], ids=["none", "no credentials", "basic scheme", "wrong token", "token prefix"])
def test_http_without_the_token_is_401(app, authorization, challenge):
    headers = {"authorization": authorization} if authorization else {}
    with httpx.Client(base_url=app.http, timeout=60, headers=headers) as http:
        for method, path, body in (("POST", "/v1/completions", BODY), ("POST", "/v1/chat/completions", {}),
                                   ("GET", "/v1/models", None), ("POST", "/v1/completions", {"max_tokens": "x"})):
            response = http.request(method, path, json=body)
            assert response.status_code == 401, (path, response.text)
            assert response.headers["www-authenticate"] == challenge
            error = response.json()["error"]
            assert error["type"] == "authentication_error" and error["message"].startswith("authorization: ")
            assert TOKEN not in response.text
        assert http.get("/health").json()["status"] == "ok"  # open: it tells only the model name


def test_http_with_the_token_and_the_openai_client(app):
    ok = httpx.post(f"{app.http}/v1/completions", json=BODY, headers={"authorization": f"bearer {TOKEN}"},
                    timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    client = openai.OpenAI(base_url=f"{app.http}/v1", api_key=TOKEN, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [MODEL]
    out = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4
    streamed = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4, temperature=0, stream=True))
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")
    wrong = openai.OpenAI(base_url=f"{app.http}/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt="def f(x):", max_tokens=4)


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}"],
                         ids=["none", "wrong token", "basic scheme"])
def test_grpc_without_the_token_is_unauthenticated(app, authorization):
    metadata = app.metadata + ((("authorization", authorization),) if authorization else ())
    with grpc.insecure_channel(app.grpc) as channel:
        generate = channel.unary_unary("/via_sd.v1.ViaSD/Generate", pb.GenerateRequest.SerializeToString,
                                       pb.GenerateResponse.FromString)
        stream = channel.unary_stream("/via_sd.v1.ViaSD/GenerateStream", pb.GenerateRequest.SerializeToString,
                                      pb.GenerateChunk.FromString)
        for request in (pb.GenerateRequest(prompt="def f(x):", max_tokens=4), pb.GenerateRequest(max_tokens=-1)):
            for call in (lambda: generate(request, metadata=metadata, timeout=60),
                         lambda: list(stream(request, metadata=metadata, timeout=60))):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
                assert err.value.details().startswith("authorization: ") and TOKEN not in err.value.details()


def test_grpc_with_the_token(app):
    metadata = app.metadata + (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(app.grpc) as channel:
        generate = channel.unary_unary("/via_sd.v1.ViaSD/Generate", pb.GenerateRequest.SerializeToString,
                                       pb.GenerateResponse.FromString)
        stream = channel.unary_stream("/via_sd.v1.ViaSD/GenerateStream", pb.GenerateRequest.SerializeToString,
                                      pb.GenerateChunk.FromString)
        request = pb.GenerateRequest(prompt="def f(x):", max_tokens=4)
        unary = generate(request, metadata=metadata, timeout=60)
        chunks = list(stream(request, metadata=metadata, timeout=60))
    assert len(unary.token_ids) == 4 and [t for c in chunks for t in c.token_ids] == list(unary.token_ids)


# -- without a server --------------------------------------------------------------------------------

def test_token_from_env_or_file(tmp_path):
    assert load_token({}) is None
    assert load_token({TOKEN_ENV: f" {TOKEN}\n"}) == TOKEN
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    assert load_token({TOKEN_FILE_ENV: str(secret)}) == TOKEN


@pytest.mark.parametrize(("environ", "expected"), [
    ({TOKEN_ENV: ""}, f"{TOKEN_ENV}: expected a non-empty token"),
    ({TOKEN_ENV: "has spaces in it"}, f"{TOKEN_ENV}: expected a token of letters"),
    ({TOKEN_ENV: TOKEN, TOKEN_FILE_ENV: "/x"}, f"{TOKEN_FILE_ENV}: expected either it or {TOKEN_ENV}"),
    ({TOKEN_FILE_ENV: "/nonexistent/token"}, f"{TOKEN_FILE_ENV}: expected a readable UTF-8 file"),
], ids=["empty", "bad characters", "both", "missing file"])
def test_a_broken_secret_is_a_config_error_not_auth_off(environ, expected):
    with pytest.raises(ConfigError) as err:
        load_token(environ)
    assert err.value.message.startswith(expected) and "has spaces" not in err.value.message


def test_empty_token_file_is_refused(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("\n")
    with pytest.raises(ConfigError, match="expected a non-empty token"):
        load_token({TOKEN_FILE_ENV: str(secret)})


def test_bearer_auth_checks():
    BearerAuth(None).check(None)  # auth off
    auth = BearerAuth(TOKEN)
    assert auth.enabled and not BearerAuth(None).enabled
    auth.check(f"Bearer {TOKEN}")
    auth.check(f"bearer   {TOKEN} ")
    auth.check_metadata([("application", "x"), ("authorization", f"Bearer {TOKEN}")])
    for value, error in ((None, MissingToken), ("", MissingToken), (TOKEN, MissingToken), ("Bearer ", MissingToken),
                         (f"Basic {TOKEN}", MissingToken), ("Bearer nope", InvalidToken),
                         (f"Bearer {TOKEN[:-1]}", InvalidToken), ("Bearer \udcff", InvalidToken)):
        with pytest.raises(error) as err:
            auth.check(value)
        assert err.value.http_status == 401 and err.value.grpc_code == "UNAUTHENTICATED"
        assert TOKEN not in err.value.message
    with pytest.raises(MissingToken):
        auth.check_metadata([("application", "x")])
