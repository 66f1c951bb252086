/* Native builds of the example work functions have no host to report progress to. */
void dcp_progress(double fraction) { (void)fraction; }
