"""hetserve on KServe: the v2 protocol on a real TorchServe, the manifests, the storage layout.

No Kubernetes cluster is available to this project. What a cluster would run is tested short of
the cluster: the manifests are built into the kserve SDK's own V1beta1InferenceService (and the
Kubernetes models it nests), and a real TorchServe serves the storage layout
deploy/kserve/build_storage.py makes, with the config.properties KServe would mount, answering
requests built by real v2 client libraries (tritonclient, kserve's data models).

The kserve SDK is installed without its dependencies (a model server's worth: fastapi, grpc,
pandas, and pins that would downgrade protobuf and psutil); only its generated models are used,
imported without running the package's ``__init__``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
import types
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydantic
import pytest
import tritonclient.http as tritonhttp
import yaml
from tritonclient.utils import InferenceServerException

from handlers.artifact.manifest import TensorSpec
from handlers.protocol.codecs import decode_request, encode_error, encode_response
from handlers.protocol.kserve_v2 import ENVELOPE_MESSAGE, ENVELOPE_STATUS, FORMAT_V2, envelope_error
from handlers.protocol.validation import RequestError, RequestLimits
from hetserve.properties import read_properties
from hetserve.tsprocess import start_torchserve
from partitioner.archive import with_config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "kserve"
MANIFESTS = sorted(DEPLOY.glob("inferenceservice-*.yaml"))
RUNTIME = DEPLOY / "clusterservingruntime.yaml"
MOUNT = "/mnt/models"  # where KServe mounts an InferenceService's storageUri
MODEL = "resnet18"  # the name the committed manifests and config.properties serve
SAMPLE = (3, 64, 64)  # resnet18-tiny


# ---------------------------------------------------------------------------------------------
# the manifests, against the kserve SDK's models


def _bare_package(name: str) -> None:
    """Register package ``name`` so its submodules import without running its ``__init__``."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        pytest.fail(
            f"{name} is not installed: pip install --no-deps kserve==0.21.0 kubernetes==37.0.1 "
            "(see docs/kserve.md)"
        )
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = package


@pytest.fixture(scope="module")
def sdk():
    for name in ("kserve", "kubernetes", "kubernetes.client"):
        _bare_package(name)
    return importlib.import_module("kserve.models"), importlib.import_module("kubernetes.client.models")


class ManifestError(ValueError):
    pass


_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def build_sdk(value, type_name: str, path: str, sdk):
    """``value`` from YAML as the SDK's ``type_name``: unknown fields and wrong types are errors.

    kserve's models are OpenAPI classes (``openapi_types`` / ``attribute_map``) whose
    deserializer silently drops unknown keys, so they are walked here field by field; the
    Kubernetes models they nest are pydantic models with ``extra="forbid"`` and strict types.
    """
    kserve_models, k8s_models = sdk
    if match := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(value, list):
            raise ManifestError(f"{path}: expected a list, got {value!r}")
        return [build_sdk(v, match[1], f"{path}[{i}]", sdk) for i, v in enumerate(value)]
    if match := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        if not isinstance(value, dict):
            raise ManifestError(f"{path}: expected a mapping, got {value!r}")
        return {k: build_sdk(v, match[1], f"{path}.{k}", sdk) for k, v in value.items()}
    if type_name in _PRIMITIVES:
        if (isinstance(value, bool) and type_name != "bool") or not isinstance(
            value, _PRIMITIVES[type_name]
        ):
            raise ManifestError(f"{path}: expected {type_name}, got {value!r}")
        return value
    if hasattr(kserve_models, type_name):
        model = getattr(kserve_models, type_name)
        if not isinstance(value, dict):
            raise ManifestError(f"{path}: expected a {type_name} mapping, got {value!r}")
        attribute_of = {key: attr for attr, key in model.attribute_map.items()}
        unknown = sorted(set(value) - set(attribute_of))
        if unknown:
            raise ManifestError(f"{path}: {type_name} has no field {', '.join(unknown)}")
        fields = {
            attribute_of[key]: build_sdk(
                item, model.openapi_types[attribute_of[key]], f"{path}.{key}", sdk
            )
            for key, item in value.items()
        }
        try:
            return model(**fields)  # the SDK's own checks: required fields, enums
        except ValueError as exc:
            raise ManifestError(f"{path}: {exc}") from None
    if hasattr(k8s_models, type_name):
        try:
            return getattr(k8s_models, type_name).model_validate(value)
        except pydantic.ValidationError as exc:
            raise ManifestError(f"{path}: {exc}") from None
    raise ManifestError(f"{path}: the SDK has no model {type_name} to check it against")


def inference_service(document: dict, sdk):
    return build_sdk(document, "V1beta1InferenceService", "InferenceService", sdk)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_is_a_valid_inference_service(path, sdk):
    isvc = inference_service(yaml.safe_load(path.read_text()), sdk)
    assert (isvc.api_version, isvc.kind) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc.spec.predictor
    model = predictor.model
    # hetserve's own runtime, not KServe's kserve-torchserve (planned for removal, kserve#5638).
    runtime = yaml.safe_load(RUNTIME.read_text())
    assert model.runtime == runtime["metadata"]["name"]
    assert model.model_format.name in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model.protocol_version == "v2" and model.storage_uri
    # Core pinning needs a Guaranteed pod with whole CPUs: requests == limits, no millicores.
    resources = model.resources
    assert resources.requests == resources.limits, "CPU/memory limits must equal the requests"
    assert re.fullmatch(r"[1-9][0-9]*", resources.requests["cpu"]), "whole CPUs only"
    assert ("nvidia.com/gpu" in resources.limits) == ("gpu" in path.stem)
    # Autoscaling on in-flight requests, never to zero (a new pod calibrates before serving).
    assert predictor.scale_metric == "concurrency" and predictor.scale_target >= 1
    assert 1 <= predictor.min_replicas <= predictor.max_replicas
    assert predictor.container_concurrency >= predictor.scale_target
    # Probes come from the runtime (readiness: hetserve.ready); a manifest may only lengthen liveness.
    props = read_properties(DEPLOY / "config" / "config.properties")
    assert list(json.loads(props["model_snapshot"])["models"]) == [MODEL]
    assert model.readiness_probe is None
    if model.liveness_probe is not None:
        assert model.liveness_probe.tcp_socket.port == int(props["inference_address"].rsplit(":", 1)[1])
    # The performance history lives on the volume mounted where HETSERVE_STATE_DIR points.
    state_dir = {e.name: e.value for e in model.env}["HETSERVE_STATE_DIR"]
    mounts = {m.mount_path: m.name for m in model.volume_mounts}
    assert mounts[state_dir] in {v.name for v in predictor.volumes}
    assert isvc.metadata.annotations["prometheus.kserve.io/port"] == "8082"


def test_runtime_is_a_valid_cluster_serving_runtime_that_runs_the_mounted_config(sdk):
    runtime = build_sdk(yaml.safe_load(RUNTIME.read_text()), "V1alpha1ClusterServingRuntime", "ClusterServingRuntime", sdk)
    assert (runtime.api_version, runtime.kind) == ("serving.kserve.io/v1alpha1", "ClusterServingRuntime")
    spec = runtime.spec
    assert {"v1", "v2"} <= set(spec.protocol_versions)
    assert [f.name for f in spec.supported_model_formats] == ["hetserve"]
    (container,) = spec.containers
    assert container.name == "kserve-container"
    assert container.command == ["torchserve"]
    args = container.args
    assert args[:2] == ["--start", "--foreground"], "TorchServe must stay the container's main process"
    props = read_properties(DEPLOY / "config" / "config.properties")
    assert args[args.index("--ts-config") + 1] == f"{MOUNT}/config/config.properties"
    assert args[args.index("--model-store") + 1] == props["model_store"]
    (port,) = container.ports
    assert port.container_port == int(props["inference_address"].rsplit(":", 1)[1])
    # /ping is 200 before the worker is READY: readiness asks the management API (hetserve.ready).
    assert container.readiness_probe.var_exec.command == ["python", "-m", "hetserve.ready", f"{MOUNT}/config/config.properties"]
    assert container.liveness_probe.tcp_socket.port == port.container_port
    assert spec.annotations["prometheus.kserve.io/port"] == props["metrics_address"].rsplit(":", 1)[1]
    # Guaranteed by default too: requests equal limits in whole CPUs.
    assert container.resources.requests == container.resources.limits


def _set(path: str, value):
    def edit(document):
        *parents, last = path.split(".")
        node = document
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


_DELETE = object()


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (_set("spec.predictor.scaleMetrik", "concurrency"), "no field scaleMetrik"),
        (_set("spec.predictor.model.resources.limits.cpu", 4), "limits.cpu"),
        (_set("spec.predictor.model.livenessProbe.tcpSocket.prot", 8080), "prot"),
        (_set("spec.predictor.model.modelFormat", _DELETE), "model_format"),
        (_set("spec.predictor.minReplicas", "1"), "expected int"),
    ],
    ids=["typo", "unquoted-quantity", "probe-typo", "no-model-format", "string-replicas"],
)
def test_validation_rejects_what_kubernetes_would(sdk, edit, fragment):
    document = copy.deepcopy(yaml.safe_load(MANIFESTS[0].read_text()))
    edit(document)
    with pytest.raises(ManifestError, match=re.escape(fragment)):
        inference_service(document, sdk)


def test_deploy_config_fits_kserve_and_the_handler():
    props = read_properties(DEPLOY / "config" / "config.properties")
    for key in ("inference_address", "management_address", "grpc_inference_port", "model_store"):
        assert props[key], key
    assert props["model_store"] == f"{MOUNT}/model-store"
    # The inference API is the pod's serving port; management and gRPC stay on loopback.
    assert re.fullmatch(r"http://0\.0\.0\.0:\d+", props["inference_address"])
    assert props["management_address"].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["enable_model_api"] == "false" and props["allowed_urls"] == "(?!)"
    assert "service_envelope" not in props and props["enable_envvars_config"] == "false"
    assert props["decode_input_request"] == "false" and props["cpu_launcher_enable"] == "false"


# ---------------------------------------------------------------------------------------------
# the v2 codec against kserve's own v2 data models, in process


SPEC_IN = (TensorSpec("image", "float32", (None, *SAMPLE)),)
SPEC_OUT = (TensorSpec("logits", "float32", (None, 10)),)


def test_kserve_request_models_decode_and_responses_fit_kserve_response_model(sdk):
    from kserve.protocol.rest.v2_datamodels import InferenceRequest, InferenceResponse, RequestInput

    x = images(2, 0)
    # model_dump_json keeps optional fields as null ("parameters": null, "outputs": null).
    body = InferenceRequest(
        inputs=[RequestInput(name="image", shape=list(x.shape), datatype="FP32", data=x.ravel().tolist())]
    ).model_dump_json()
    assert '"parameters":null' in body.replace(" ", "")
    request = decode_request(body.encode(), "application/json", {}, SPEC_IN, RequestLimits(), outputs=SPEC_OUT)
    assert request.format == FORMAT_V2 and request.request_id is None
    np.testing.assert_array_equal(request.arrays["image"], x)
    logits = np.arange(20, dtype=np.float32).reshape(2, 10)
    encoded = encode_response({"logits": logits}, request, SPEC_OUT, model_name=MODEL, model_version="1.0")
    # KServe's response model requires an id even when the request sent none.
    answer = InferenceResponse.model_validate_json(encoded.body)
    assert answer.id and answer.outputs[0].shape == [2, 10]
    np.testing.assert_array_equal(np.asarray(answer.outputs[0].data, np.float32).reshape(2, 10), logits)


def test_errors_on_kserve_routes_use_kserve_form():
    # TorchServe's frontend marks requests: "explain" on every route, "url_path" on /predictions.
    v2_route, predictions_route = {"explain": "False"}, {"explain": "False", "url_path": ""}
    for headers, key in ((v2_route, "error"), (predictions_route, "message")):
        with pytest.raises(RequestError) as info:
            decode_request(b"[[1,", "application/json", headers, SPEC_IN, RequestLimits())
        assert info.value.status == 400
        assert "invalid JSON" in json.loads(encode_error(info.value).body)[key]


# ---------------------------------------------------------------------------------------------
# the storage layout


@pytest.fixture(scope="module")
def archive(tmp_path_factory, tiny_named) -> Path:
    """The session's resnet18-tiny archive (cut at 0.5 and 0.8), named MODEL, batching on: up
    to 4 requests per batch, waiting up to 200 ms for them to gather."""
    return tiny_named(tmp_path_factory.mktemp("mar"), MODEL, {"batchSize": 4, "maxBatchDelay": 200})


def build_storage(mar: Path, out: Path) -> subprocess.CompletedProcess:
    script = DEPLOY / "build_storage.py"
    return subprocess.run([sys.executable, str(script), str(mar), str(out)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def layout(archive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kserve") / MODEL
    done = build_storage(archive, out)
    assert done.returncode == 0, done.stderr
    return out


def test_layout_is_what_the_runtime_mounts(layout, archive):
    assert (layout / "model-store" / f"{MODEL}.mar").read_bytes() == archive.read_bytes()
    props = read_properties(layout / "config" / "config.properties")
    template = read_properties(DEPLOY / "config" / "config.properties")
    assert {k: v for k, v in props.items() if k != "model_snapshot"} == {
        k: v for k, v in template.items() if k != "model_snapshot"
    }
    with zipfile.ZipFile(archive) as z:
        config = yaml.safe_load(z.read("model-config.yaml"))
    ((version, entry),) = json.loads(props["model_snapshot"])["models"][MODEL].items()
    assert version == "1.0" and entry["marName"] == f"{MODEL}.mar"
    assert (entry["batchSize"], entry["maxBatchDelay"]) == (config["batchSize"], config["maxBatchDelay"]) == (4, 200)
    assert (entry["minWorkers"], entry["maxWorkers"]) == (1, 1)


def test_layout_refuses_several_workers_per_pod(archive, tmp_path):
    variant = with_config(archive, tmp_path / f"{MODEL}.mar", {"minWorkers": 2, "maxWorkers": 2})
    done = build_storage(variant, tmp_path / "out")
    assert done.returncode == 2
    assert "one worker" in done.stderr and "with_config" in done.stderr
    assert not (tmp_path / "out" / "model-store").exists()


def test_layout_serves_one_worker_from_an_archive_whose_count_auto_derived(tiny_mar, tmp_path):
    """tiny_mar is built with the shipped ``minWorkers/maxWorkers: auto``: whatever count that
    gave on this box, the pod's snapshot asks for one worker, with a note when it was more."""
    with zipfile.ZipFile(tiny_mar) as z:
        config = yaml.safe_load(z.read("model-config.yaml"))
    derived = (config["minWorkers"], config["maxWorkers"])
    done = build_storage(tiny_mar, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    if derived != (1, 1):
        assert "derived on the archiving box" in done.stdout and "the snapshot asks for 1" in done.stdout
        assert f"{derived[0]}/{derived[1]}" in done.stdout
    else:
        assert "note:" not in done.stdout
    props = read_properties(tmp_path / "out" / "config" / "config.properties")
    ((_, entry),) = json.loads(props["model_snapshot"])["models"]["tiny"].items()
    assert (entry["minWorkers"], entry["maxWorkers"]) == (1, 1)
    assert (tmp_path / "out" / "model-store" / "tiny.mar").read_bytes() == tiny_mar.read_bytes()


def test_layout_refuses_a_count_set_after_auto_derived_one(tiny_mar, tmp_path):
    """A count a variant sets (with_config) was asked for, even where ``auto`` set the other."""
    variant = with_config(tiny_mar, tmp_path / "tiny.mar", {"maxWorkers": 3})
    done = build_storage(variant, tmp_path / "out")
    assert done.returncode == 2 and "one worker" in done.stderr, done.stderr
    assert not (tmp_path / "out" / "model-store").exists()


def test_layout_refuses_an_archive_that_is_not_hetserve(tmp_path):
    bogus = tmp_path / "other.mar"
    with zipfile.ZipFile(bogus, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", "{}")
    done = build_storage(bogus, tmp_path / "out")
    assert done.returncode == 2 and "not a hetserve archive" in done.stderr


# ---------------------------------------------------------------------------------------------
# TorchServe's own kservev2 envelope, in process


V2_BODY = {"inputs": [{"name": "image", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}


def test_batches_as_torchserve_passes_them_are_not_mistaken_for_an_envelope():
    body = json.dumps(V2_BODY).encode()
    assert envelope_error([{"body": body}, {"body": bytearray(body)}], 2) is None
    # form parts and query parameters arrive as more byte values; an empty form as no value
    assert envelope_error([{"data": b"1", "name": b"x", "extra": bytearray(b"q")}], 1) is None
    assert envelope_error([{}], 1) is None
    assert envelope_error([{"body": body}], None) is None


# (The json envelope cannot read the bytes hetserve has TorchServe pass: it fails inside
# TorchServe, before the handler, and TorchServe answers every request of the batch 503.)
@pytest.mark.parametrize("envelope_name", ["kservev2", "body"])
def test_a_batch_rewritten_by_a_stock_envelope_is_detected(envelope_name):
    """TorchServe's own envelope classes rewrite a real batch; the rewrite is always seen."""
    from ts.context import Context
    from ts.model_loader import TsModelLoader

    seen = []
    envelope = TsModelLoader()._load_default_envelope(envelope_name)(lambda data, ctx: seen.append(data) or [])
    context = Context(MODEL, ".", {"model": {"modelName": MODEL, "modelVersion": "1.0"}}, 4, None, "0.12.0")
    batch = [{"body": json.dumps(V2_BODY).encode()} for _ in range(3)]
    assert envelope_error(batch, 3) is None
    envelope.handle(batch, context)
    (rewritten,) = seen
    if envelope_name == "kservev2":
        assert len(rewritten) == 1, "the kservev2 envelope keeps the first request's inputs only"
    assert envelope_error(rewritten, 3) == ENVELOPE_MESSAGE


# ---------------------------------------------------------------------------------------------
# the v2 protocol on a real TorchServe serving the layout


@pytest.fixture(scope="module")
def server(layout, tmp_path_factory):
    """The KServe layout's config.properties (ports moved for the test, token auth on for the
    harness), with the variable KServe's runtime sets for a serviceEnvelope label: ignored."""
    ts = start_torchserve(
        tmp_path_factory.mktemp("ts"), layout / "model-store", {MODEL: f"{MODEL}.mar"},
        overrides={"disable_token_authorization": "false"},
        env={"TS_SERVICE_ENVELOPE": "kservev2"},
        base_config=layout / "config" / "config.properties",
    )
    yield ts
    ts.stop()


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory):
    """The unsplit model from the archive, run by ORT in this process."""
    out = tmp_path_factory.mktemp("unzipped")
    with zipfile.ZipFile(archive) as z:
        z.extractall(out)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x})[0]


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SAMPLE)).astype(np.float32)


def auth(server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.keys['inference']}"}


@pytest.fixture(scope="module")
def triton(server):
    client = tritonhttp.InferenceServerClient(
        f"127.0.0.1:{server.ports['inference']}", concurrency=4, network_timeout=120.0
    )
    yield client
    client.close()


def triton_input(x: np.ndarray, name: str = "image", datatype: str = "FP32", binary: bool = False):
    tensor = tritonhttp.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


@pytest.mark.server
def test_v2_infer_round_trip_with_tritonclient(server, triton, reference):
    x = images(2, 1)
    result = triton.infer(
        MODEL, [triton_input(x)], request_id="triton-1", headers=auth(server),
        outputs=[tritonhttp.InferRequestedOutput("logits", binary_data=False)],
    )
    body = result.get_response()
    assert body["id"] == "triton-1" and body["model_name"] == MODEL
    (out,) = body["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("logits", "FP32", [2, 10])
    np.testing.assert_allclose(result.as_numpy("logits"), reference(x), atol=1e-4)


@pytest.mark.server
def test_v2_without_outputs_or_id_gets_every_output_and_an_id(server, triton, reference):
    # tritonclient then asks for every output in binary (binary_data_output): answered so.
    x = images(1, 2)
    result = triton.infer(MODEL, [triton_input(x)], headers=auth(server))
    body = result.get_response()
    assert body["id"], "the v2 response schema requires an id"
    assert body["outputs"][0]["parameters"] == {"binary_data_size": 10 * 4}
    np.testing.assert_allclose(result.as_numpy("logits"), reference(x), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# the binary tensor extension: standard clients with their defaults, on both routes


@pytest.mark.server
def test_tritonclient_defaults_binary_in_and_out(server, triton, reference):
    """InferInput.set_data_from_numpy and InferRequestedOutput exactly as a Triton user writes them."""
    x = images(2, 30)
    tensor = tritonhttp.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # default binary_data=True
    result = triton.infer(MODEL, [tensor], outputs=[tritonhttp.InferRequestedOutput("logits")],
                          request_id="bin-1", headers=auth(server))
    body = result.get_response()
    assert body["id"] == "bin-1"
    (out,) = body["outputs"]
    assert out["shape"] == [2, 10] and "data" not in out
    assert out["parameters"] == {"binary_data_size": 2 * 10 * 4}
    np.testing.assert_allclose(result.as_numpy("logits"), reference(x), atol=1e-4)


@pytest.mark.server
def test_tritonclient_binary_body_on_the_predictions_route(server, reference):
    """The same bytes tritonclient sends, posted to /predictions (where KServe's older wrappers go)."""
    x = images(1, 31)
    tensor = tritonhttp.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    body, json_size = tritonhttp.InferenceServerClient.generate_request_body([tensor], request_id="bin-2")
    headers = {"Inference-Header-Content-Length": str(json_size), **auth(server)}
    for path in (f"/predictions/{MODEL}", f"/v2/models/{MODEL}/infer"):
        resp = server.request("POST", path, body, headers)
        assert resp.status == 200, resp.body
        length = int(resp.headers["inference-header-content-length"])
        result = tritonhttp.InferResult.from_response_body(resp.body, header_length=length)
        assert result.get_response()["id"] == "bin-2"
        np.testing.assert_allclose(result.as_numpy("logits").reshape(1, 10), reference(x), atol=1e-4)


@pytest.mark.server
def test_kserve_infer_request_binary_serialisation_on_both_routes(server, reference, sdk):
    from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse, RequestedOutput

    x = images(2, 32)
    tensor = InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    request = InferRequest(model_name=MODEL, infer_inputs=[tensor], request_id="kbin-1",
                           request_outputs=[RequestedOutput("logits", parameters={"binary_data": True})])
    body, json_length = request.to_rest()
    assert json_length is not None and json_length < len(body)
    headers = {"Inference-Header-Content-Length": str(json_length), "Content-Type": "application/octet-stream",
               **auth(server)}
    for path in (f"/v2/models/{MODEL}/infer", f"/predictions/{MODEL}"):
        resp = server.request("POST", path, body, headers)
        assert resp.status == 200, resp.body
        answer = InferResponse.from_bytes(resp.body, int(resp.headers["inference-header-content-length"]))
        assert answer.id == "kbin-1"
        np.testing.assert_allclose(answer.outputs[0].as_numpy().reshape(2, 10), reference(x), atol=1e-4)


@pytest.mark.server
def test_bad_binary_sizes_are_a_400_naming_the_input_on_both_routes(server):
    x = images(1, 33)
    tensor = tritonhttp.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    body, json_size = tritonhttp.InferenceServerClient.generate_request_body([tensor])
    headers = {"Inference-Header-Content-Length": str(json_size), **auth(server)}
    for path, key in ((f"/v2/models/{MODEL}/infer", "error"), (f"/predictions/{MODEL}", "error")):
        resp = server.request("POST", path, body[:-4], headers)  # the blob lost its last float
        assert resp.status == 400, resp.body
        assert "input 'image': binary_data_size 49152 runs past the end" in resp.json()[key]


@pytest.mark.server
def test_v2_body_from_kserve_models_on_both_routes(server, reference, sdk):
    from kserve.protocol.rest.v2_datamodels import InferenceRequest, InferenceResponse, RequestInput

    x = images(3, 3)
    request = InferenceRequest(
        id="kserve-1",
        inputs=[RequestInput(name="image", shape=list(x.shape), datatype="FP32", data=x.ravel().tolist())],
    )
    body = request.model_dump_json(exclude_none=True).encode()
    headers = {"Content-Type": "application/json", **auth(server)}
    # KServe's wrapper forwards to the v2 route; older wrappers to /predictions: both answer v2.
    for path in (f"/v2/models/{MODEL}/infer", f"/predictions/{MODEL}"):
        resp = server.request("POST", path, body, headers)
        assert resp.status == 200, resp.body
        answer = InferenceResponse.model_validate_json(resp.body)
        assert answer.id == "kserve-1" and answer.model_name == MODEL
        (out,) = answer.outputs
        assert out.shape == [3, 10] and out.datatype == "FP32"
        np.testing.assert_allclose(np.asarray(out.data, np.float32).reshape(3, 10), reference(x), atol=1e-4)


@pytest.mark.server
def test_concurrent_v2_requests_are_batched_and_each_gets_its_own_rows(server, reference, sdk):
    from kserve.protocol.rest.v2_datamodels import InferenceRequest, InferenceResponse, RequestInput

    inputs = {i: images(1 + i % 2, 10 + i) for i in range(8)}

    def send(i: int):
        request = InferenceRequest(
            id=f"req-{i}",
            inputs=[RequestInput(name="image", shape=list(inputs[i].shape), datatype="FP32", data=inputs[i].ravel().tolist())],
        )
        headers = {"Content-Type": "application/json", **auth(server)}
        return i, server.request("POST", f"/v2/models/{MODEL}/infer", request.model_dump_json().encode(), headers)

    with ThreadPoolExecutor(4) as pool:
        replies = dict(pool.map(send, inputs))
    assert sorted(replies) == sorted(inputs), "every request answered"
    for i, resp in replies.items():
        assert resp.status == 200, resp.body
        answer = InferenceResponse.model_validate_json(resp.body)
        assert answer.id == f"req-{i}"
        got = np.asarray(answer.outputs[0].data, np.float32).reshape(answer.outputs[0].shape)
        np.testing.assert_allclose(got, reference(inputs[i]), atol=1e-4)
    assert max(int(r.headers["x-hetserve-batch"]) for r in replies.values()) > 1, "no batch formed"


BAD_V2 = [
    pytest.param(lambda x: [triton_input(x[:, :, :32], binary=True)], None, "400", "expected shape", id="binary-wrong-shape"),
    pytest.param(lambda x: [triton_input(x.astype(np.int64), datatype="INT64")], None, "400", "int64 cannot be converted to float32", id="lossy-datatype"),
    pytest.param(lambda x: [triton_input(x[:, :, :32])], None, "400", "expected shape", id="wrong-shape"),
    pytest.param(lambda x: [triton_input(x, name="pixels")], None, "400", "unknown input 'pixels'", id="unknown-input"),
    pytest.param(lambda x: [triton_input(x)], "probs", "400", "unknown output 'probs'", id="unknown-output"),
    pytest.param(lambda x: [triton_input(np.full_like(x, np.nan))], None, "400", "NaN", id="nan"),
]


@pytest.mark.server
@pytest.mark.parametrize(("inputs", "output", "status", "fragment"), BAD_V2)
def test_bad_v2_requests_get_a_4xx_error_naming_the_problem(server, triton, inputs, output, status, fragment):
    pids = server.worker_pids()
    outputs = [tritonhttp.InferRequestedOutput(output, binary_data=False)] if output else None
    with pytest.raises(InferenceServerException) as info:
        triton.infer(MODEL, inputs(images(1, 4)), outputs=outputs, headers=auth(server))
    # tritonclient reads the protocol's {"error": ...}; anything else shows up as a decode failure.
    assert info.value.status() == status, info.value.message()
    assert fragment in info.value.message() and "decoding the response" not in info.value.message()
    assert server.worker_pids() == pids, "a bad request must not restart the worker"


@pytest.mark.server
def test_malformed_json_is_answered_in_the_form_of_the_route(server):
    headers = {"Content-Type": "application/json", **auth(server)}
    resp = server.request("POST", f"/v2/models/{MODEL}/infer", b'{"inputs": [', headers)
    assert resp.status == 400 and "invalid JSON" in resp.json()["error"]
    resp = server.request("POST", f"/predictions/{MODEL}", b'{"inputs": [', headers)
    assert resp.status == 400 and "invalid JSON" in resp.json()["message"]


@pytest.mark.server
def test_bad_requests_in_a_batch_fail_alone(server, triton, reference):
    good = {i: images(1, 20 + i) for i in range(0, 8, 2)}
    handles = {}
    for i in range(8):
        tensor = triton_input(good[i]) if i in good else triton_input(images(1, 0)[:, :1], datatype="FP32")
        handles[i] = triton.async_infer(MODEL, [tensor], request_id=f"mix-{i}", headers=auth(server))
    for i, handle in handles.items():
        if i in good:
            result = handle.get_result()
            assert result.get_response()["id"] == f"mix-{i}"
            np.testing.assert_allclose(result.as_numpy("logits"), reference(good[i]), atol=1e-4)
        else:
            with pytest.raises(InferenceServerException, match="expected shape"):
                handle.get_result()


# ---------------------------------------------------------------------------------------------
# TorchServe's kservev2 envelope configured anyway: every request fails, loudly


@pytest.fixture(scope="module")
def envelope_server(layout, tmp_path_factory):
    ts = start_torchserve(
        tmp_path_factory.mktemp("ts-envelope"), layout / "model-store", {MODEL: f"{MODEL}.mar"},
        overrides={"disable_token_authorization": "false", "service_envelope": "kservev2"},
        base_config=layout / "config" / "config.properties",
    )
    yield ts
    ts.stop()


@pytest.mark.server
def test_stock_kservev2_envelope_fails_every_request_with_a_clear_message(envelope_server):
    x = images(1, 5)
    body = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}).encode()
    headers = {"Content-Type": "application/json", **auth(envelope_server)}

    def send(_):
        return envelope_server.request("POST", f"/v2/models/{MODEL}/infer", body, headers)

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(send, range(4)))
    for resp in replies:  # batched or alone, none succeeds and none goes unanswered
        assert resp.status == ENVELOPE_STATUS, resp.body
        assert "service_envelope" in resp.json()["message"]
    assert envelope_server.worker_pids(), "the worker stays up"
    assert "service_envelope" in envelope_server.log_text()


# ---------------------------------------------------------------------------------------------
# hetserve's runtime: TorchServe started with exactly the ClusterServingRuntime's command


@pytest.fixture(scope="module")
def runtime_server(layout, tmp_path_factory):
    """The runtime container's command and args, the storage layout standing in for /mnt/models.

    Only the ports differ from the pod (free ones, so the test can run beside other servers); token
    auth stays off as in the pod, so nothing below sends a token.
    """
    import os

    from hetserve.tsprocess import TorchServe, free_port, write_config

    work = tmp_path_factory.mktemp("ts-runtime")
    (work / "tmp").mkdir()
    ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc_inference", "grpc_management")}
    config = write_config(work, layout / "model-store", ports, {"initial_worker_port": str(free_port())},
                          base_config=layout / "config" / "config.properties")
    assert read_properties(config)["disable_token_authorization"] == "true"
    (container,) = yaml.safe_load(RUNTIME.read_text())["spec"]["containers"]
    args = [str(config) if a == f"{MOUNT}/config/config.properties" else a.replace(MOUNT, str(layout))
            for a in container["args"]]
    venv_bin = Path(sys.executable).parent
    command = [str(venv_bin / container["command"][0]), *args]
    env = {**os.environ, "TMPDIR": str(work / "tmp"), "TEMP": str(work / "tmp"),
           "LOG_LOCATION": str(work / "logs"), "METRICS_LOCATION": str(work / "logs"),
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(work / "torchserve.out", "wb") as out:
        process = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = TorchServe(work, ports, process)
    try:
        yield server
    finally:
        server.stop()


def _probe(command: list[str], config: Path) -> int:
    argv = [sys.executable if c == "python" else str(config) if c.endswith("config.properties") else c for c in command]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode


@pytest.mark.server
def test_runtime_command_serves_the_layout_and_its_readiness_probe_waits_for_the_worker(runtime_server):
    import time

    (container,) = yaml.safe_load(RUNTIME.read_text())["spec"]["containers"]
    probe = container["readinessProbe"]["exec"]["command"]
    config = runtime_server.workdir / "config.properties"
    deadline, timeline = time.monotonic() + 300, []
    while time.monotonic() < deadline:
        assert runtime_server.process.poll() is None, (runtime_server.workdir / "torchserve.out").read_text()[-3000:]
        try:
            ping = runtime_server.request("GET", "/ping", token=False, timeout=5).status
        except OSError:
            ping = None
        workers = []
        if ping is not None:
            reply = runtime_server.request("GET", f"/models/{MODEL}", api="management", token=False, timeout=5)
            workers = [w["status"] for w in reply.json()[0]["workers"]] if reply.status == 200 else []
        # The probe runs after the state was read: a worker READY before stays READY.
        timeline.append((ping, workers, _probe(probe, config)))
        if timeline[-1][2] == 0:
            break
        time.sleep(0.5)
    assert timeline[-1][2] == 0, f"never ready: {timeline[-5:]}\n{runtime_server.log_text()[-3000:]}"
    # Ready means READY: read after the probe passed (a READY worker stays READY).
    reply = runtime_server.request("GET", f"/models/{MODEL}", api="management", token=False)
    assert [w["status"] for w in reply.json()[0]["workers"]] == ["READY"]
    # Before, the probe failed while the worker was not READY, whatever /ping said (200 early).
    assert all(code != 0 for _, _, code in timeline[:-1])
    x = images(1, 7)
    body = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    resp = runtime_server.request("POST", f"/v2/models/{MODEL}/infer", body,
                                  {"Content-Type": "application/json"}, token=False)
    assert resp.status == 200, resp.body
    assert resp.json()["outputs"][0]["shape"][0] == 1
