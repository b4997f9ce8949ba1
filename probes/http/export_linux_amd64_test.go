package http

// SetPropagationCgroupForTest makes the next Attach attach its sock_ops
// program to dir instead of the process's cgroup; the returned function
// restores it.
func SetPropagationCgroupForTest(dir string) (restore func()) {
	old := testHookCgroup
	testHookCgroup = dir
	return func() { testHookCgroup = old }
}
