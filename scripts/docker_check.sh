#!/usr/bin/env bash
# End-to-end check of the container deployment (docker/): builds the CPU image from a local base
# image, starts the compose stack on loopback (2 service replicas + nginx + Prometheus), posts an
# image through the load balancer, reads both replicas' metrics from Prometheus, kills one
# replica and shows that requests still succeed, then tears the stack down.
#
# Needs a running Docker engine, a BuildKit-capable docker CLI, docker compose (v2) or
# docker-compose (1.29), and .venv (for the engine artifact and the test photo). Takes minutes;
# CI does not run it. Everything it starts listens on 127.0.0.1 only.
#
#   bash scripts/docker_check.sh
#
# Environment (all optional):
#   BASE_IMAGE   base of every image (default local/debian:bookworm; made with debootstrap
#                when missing; debian:bookworm-slim works where Docker Hub is reachable)
#   CA_BUNDLE    extra CA bundle for pip inside the build (default: $PIP_CERT when set)
#   WORK         scratch folder (default: a new one under /tmp); the engine artifact is kept in
#                $WORK/artifacts and reused when the script is run again with the same WORK
#   LB_PORT, PROMETHEUS_PORT   loopback ports (default 18080, 19090)
#   KEEP=1       leave the stack running at the end (tear it down with the printed command)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

BASE_IMAGE=${BASE_IMAGE:-local/debian:bookworm}
CA_BUNDLE=${CA_BUNDLE:-${PIP_CERT:-}}
WORK=${WORK:-$(mktemp -d /tmp/maskrcnn-docker-check.XXXXXX)}
LB_PORT=${LB_PORT:-18080}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-19090}
PROJECT=maskrcnn-check
IMAGE=maskrcnn-serve:check-cpu
NGINX_STANDIN=maskrcnn-check/nginx:bookworm
PROMETHEUS_STANDIN=maskrcnn-check/prometheus:bookworm
REPLICAS=2
PY=$ROOT/.venv/bin/python
mkdir -p "$WORK"

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

# ---- tools ----------------------------------------------------------------------------------
step "tools"
docker info >/dev/null 2>&1 || fail "no Docker engine answers (start dockerd first)"
# `docker build --secret` needs BuildKit: buildx, or an older CLI's built-in BuildKit client.
BUILD_CLI=
for cli in docker /usr/bin/docker; do
  if DOCKER_BUILDKIT=1 "$cli" build --help 2>&1 | grep -q -- '--secret'; then BUILD_CLI=$cli; break; fi
done
[ -n "$BUILD_CLI" ] || fail "no docker CLI here builds with BuildKit (install docker-buildx)"
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
else fail "neither 'docker compose' nor 'docker-compose' is installed"; fi
[ -x "$PY" ] || fail ".venv is missing: run bash scripts/setup.sh"
echo "engine: $(docker version --format '{{.Server.Version}}'); build CLI: $BUILD_CLI; compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || true)); work: $WORK"

# ---- base image -------------------------------------------------------------------------------
step "base image $BASE_IMAGE"
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  [ "$BASE_IMAGE" = local/debian:bookworm ] || fail "$BASE_IMAGE is not present; pull or build it first"
  command -v debootstrap >/dev/null || fail "debootstrap is needed to make $BASE_IMAGE (apt-get install debootstrap)"
  t0=$(date +%s)
  rootfs=$WORK/rootfs
  nice debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || fail "debootstrap failed; see $WORK/debootstrap.log"
  # Slim it the way debian:bookworm-slim is: no package lists, caches, docs or locales.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  echo "made $BASE_IMAGE with debootstrap in $(elapsed "$t0")"
fi

# ---- images -----------------------------------------------------------------------------------
step "images"
secret=()
[ -n "$CA_BUNDLE" ] && secret=(--secret "id=ca,src=$CA_BUNDLE")
build() {  # build TAG LOG ARGS...: nice'd BuildKit build with the optional CA secret, timed
  local tag=$1 log=$2; shift 2
  local t0; t0=$(date +%s)
  DOCKER_BUILDKIT=1 nice "$BUILD_CLI" build --progress=plain "${secret[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    -t "$tag" "$@" >"$log" 2>&1 || { tail -30 "$log" >&2; fail "building $tag failed; see $log"; }
  echo "$tag: built in $(elapsed "$t0"), $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')"
}
build "$IMAGE" "$WORK/build-cpu.log" -f docker/Dockerfile --target runtime .
build "$NGINX_STANDIN" "$WORK/build-nginx.log" -f docker/debian-packages.Dockerfile --build-arg PACKAGES=nginx docker
build "$PROMETHEUS_STANDIN" "$WORK/build-prometheus.log" -f docker/debian-packages.Dockerfile --build-arg PACKAGES=prometheus docker
[ "$(docker image inspect -f '{{.Config.User}}' "$IMAGE")" = maskrcnn ] || fail "$IMAGE does not run as the maskrcnn user"
docker run --rm --entrypoint python "$IMAGE" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
  || fail "$IMAGE has torch inside"
echo "$IMAGE: runs as user maskrcnn, no torch inside"

# ---- engine artifact (built on the host: the builder image has torch, too big to build here) --
step "engine artifact"
ARTIFACTS=$WORK/artifacts
if [ ! -f "$ARTIFACTS/ort-fp32/manifest.json" ]; then
  t0=$(date +%s)
  mkdir -p "$ARTIFACTS"
  nice .venv/bin/maskrcnn-build all --random-init --out "$ARTIFACTS/ort-fp32" --no-verify >"$WORK/engine.log" 2>&1 \
    || fail "maskrcnn-build failed; see $WORK/engine.log"
  echo "built $ARTIFACTS/ort-fp32 (random init) in $(elapsed "$t0")"
fi
chmod -R a+rX "$ARTIFACTS"

# ---- stack --------------------------------------------------------------------------------------
export MASKRCNN_IMAGE=$IMAGE
# The CPU image's build-engine finds the artifact and exits 0: the builder step runs for real,
# with no torch image.
export MASKRCNN_BUILDER_IMAGE=$IMAGE
export MASKRCNN_ARTIFACTS=$ARTIFACTS MASKRCNN_REPLICAS=$REPLICAS MASKRCNN_THREADS=1
export NGINX_IMAGE=$NGINX_STANDIN PROMETHEUS_IMAGE=$PROMETHEUS_STANDIN
export BIND_ADDRESS=127.0.0.1 LB_PORT PROMETHEUS_PORT
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f docker/docker-compose.yml "$@"; }
down() { compose down -v --remove-orphans >/dev/null 2>&1 || true; }
if [ "${KEEP:-0}" = 1 ]; then
  trap 'echo "stack left running; tear down: ${COMPOSE[*]} -p $PROJECT -f docker/docker-compose.yml down -v"' EXIT
else
  trap down EXIT
fi

step "compose up: builder, $REPLICAS replicas, nginx, prometheus (grafana: its image cannot be built here)"
down
t0=$(date +%s)
compose up -d --no-build --scale "maskrcnn=$REPLICAS" nginx prometheus >"$WORK/compose-up.log" 2>&1 \
  || { cat "$WORK/compose-up.log" >&2; compose logs --tail 40 >&2 || true; fail "compose up failed"; }
echo "stack up (replicas healthy, nginx started) in $(elapsed "$t0")"
compose ps
compose logs builder | tail -2

LB=http://127.0.0.1:$LB_PORT
PROM=http://127.0.0.1:$PROMETHEUS_PORT
prom_query() {  # prom_query PROMQL: prints "labels value" per series of an instant query
  curl -sfG "$PROM/api/v1/query" --data-urlencode "query=$1" | "$PY" -c '
import json, sys
for r in json.load(sys.stdin)["data"]["result"]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(r["metric"].items()))
    print(labels or "{}", r["value"][1])'
}
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: retries COMMAND every 2 s
  local deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "timed out waiting for $what"
    sleep 2
  done
}

# ---- requests through the load balancer ---------------------------------------------------
PHOTO=$("$PY" -c "import skimage, pathlib; print(pathlib.Path(skimage.data_dir) / 'coffee.png')")
post() {  # post: one /predict through the LB; prints the status code, keeps the body
  curl -s -o "$WORK/last.json" -w '%{http_code}' --max-time 60 -F "image=@$PHOTO" "$LB/predict?score_threshold=0.3"
}
post_many() {  # post_many N: N requests, 2 at a time; fails unless every one answers 200
  local n=$1 codes
  codes=$(seq "$n" | xargs -P 2 -I{} curl -s -o /dev/null -w '%{http_code}\n' \
          --max-time 60 -F "image=@$PHOTO" "$LB/predict")
  echo "status codes: $(echo "$codes" | sort | uniq -c | awk '{printf "%s x%s ", $2, $1}')"
  [ "$(echo "$codes" | grep -vc '^200$')" = 0 ] || fail "not every request succeeded"
}

step "POST /predict through nginx ($LB)"
code=$(post)
[ "$code" = 200 ] || { cat "$WORK/last.json" >&2; fail "/predict answered $code"; }
"$PY" - "$WORK/last.json" <<'EOF'
import json, sys
body = json.load(open(sys.argv[1]))
image = body["image"]
print(f"200: {len(body['detections'])} detections on a {image['width']}x{image['height']} image; timings_ms {body['timings_ms']}")
EOF
post_many 6

step "Prometheus ($PROM) scrapes both replicas"
targets_up() { [ "$(prom_query 'count(up{job="maskrcnn"} == 1)' | awk '{print $2}')" = "$1" ]; }
wait_for 60 "$REPLICAS replicas up in Prometheus" targets_up "$REPLICAS"
prom_query 'up{job="maskrcnn"}'
# 1 + 6 requests so far: every one must be counted, and by both replicas together.
all_counted() {
  [ "$(prom_query 'count(maskrcnn_requests_total{endpoint="/predict",status="200"} > 0)' | awk '{print $2}')" = "$REPLICAS" ] &&
  [ "$(prom_query 'sum(maskrcnn_requests_total{endpoint="/predict",status="200"})' | awk '{print $2}')" = 7 ]
}
wait_for 30 "all 7 requests counted, by every replica" all_counted
echo "/predict answered (200) per replica:"
prom_query 'sum by (instance) (maskrcnn_requests_total{endpoint="/predict",status="200"})'
echo "mean /predict latency per replica (s; 2 requests at a time, 1 thread each):"
prom_query 'sum by (instance) (maskrcnn_stage_seconds_sum{stage="total"}) / sum by (instance) (maskrcnn_stage_seconds_count{stage="total"})'

step "every Grafana dashboard query evaluates in Prometheus"
"$PY" - "$PROM" docker/grafana/dashboards/maskrcnn-serve.json <<'EOF' || fail "a dashboard query is not valid PromQL"
import json, sys, urllib.parse, urllib.request
prom, path = sys.argv[1:]
failed = 0
for panel in json.load(open(path))["panels"]:
    for target in panel["targets"]:
        # Grafana's variables, as Grafana would expand them here.
        expr = target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
        url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            body = json.load(urllib.request.urlopen(url, timeout=10))
        except Exception as exc:  # a PromQL error is an HTTP 400 with a JSON body
            body = json.load(exc) if hasattr(exc, "read") else {"status": "error", "error": str(exc)}
        ok = body["status"] == "success"
        failed += not ok
        detail = f"{len(body['data']['result'])} series" if ok else body.get("error")
        print(f"  {'ok ' if ok else 'BAD'} {panel['title']} [{target['refId']}]: {detail}")
sys.exit(1 if failed else 0)
EOF

# ---- failover --------------------------------------------------------------------------------
step "kill one replica; requests still succeed"
victim=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=maskrcnn" | head -1)
[ -n "$victim" ] || fail "no replica container found"
docker kill "$victim" >/dev/null
echo "killed $(docker inspect -f '{{.Name}}' "$victim")"
post_many 6
echo "killed replica's state now: $(docker inspect -f '{{.State.Status}}' "$victim")"
wait_for 60 "Prometheus to see one replica" targets_up 1
echo "Prometheus now: $(prom_query 'count(up{job="maskrcnn"} == 1)' | awk '{print $2}') replica(s) up"

step "PASS: image built, $REPLICAS replicas behind nginx, scraped by Prometheus, failover works"
