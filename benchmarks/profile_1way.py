"One 1-way training step of the medium preset under torch.profiler, one thread (benchmarks/results/profile_1way_medium.txt)."
import torch, time
from torch.profiler import profile, ProfilerActivity
from jigsaw_ref.config import preset
from jigsaw_ref.mixer import WeatherMixer
from jigsaw_ref.parallel import loss_share
from jigsaw_ref.loss import lat_weights_cos, variable_weights
torch.set_num_threads(1)
cfg = preset("medium")
m = WeatherMixer(cfg)
opt = torch.optim.Adam(m.parameters(), lr=1e-4, weight_decay=3e-6)
x, y = torch.randn(1, cfg.n_in, cfg.n_lat, cfg.n_lon), torch.randn(1, cfg.n_out, cfg.n_lat, cfg.n_lon)
lw, vw = lat_weights_cos(torch.linspace(-89, 89, cfg.n_lat)), variable_weights(cfg)
def step():
    opt.zero_grad(set_to_none=False)
    loss = loss_share(m(x), y, lw, vw, y.numel()); loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
step()
with profile(activities=[ProfilerActivity.CPU]) as prof: step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
