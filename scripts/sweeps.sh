# Shared by the grid scripts: run_sweeps OUT runs each entry of the array `sweeps` as one `ptq.run -m` sweep with the
# settings of the array `common`, JOBS at a time (default 1), each into OUT/sweep<i> with its log in OUT/sweep<i>.log.
run_sweeps() {
  local out=$1 i=0 sweep
  mkdir -p "$out"
  for sweep in "${sweeps[@]}"; do
    # shellcheck disable=SC2086
    ${PYTHON:-python} -m ptq.run -m $sweep "${common[@]}" "hydra.sweep.dir=$out/sweep$i" > "$out/sweep$i.log" 2>&1 &
    i=$((i + 1))
    while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-1}" ]; do wait -n || true; done
  done
  wait
}
